"""Data pipeline: probing/decoding, TFDS build (bad inputs), clip sampling rules, loader determinism/resume/
sharding, synthetic clips, latent cache. Videos are tiny and written here with imageio-ffmpeg."""
import collections
import csv
import json
import os

import numpy as np
import pytest

from svi_jax.data import builder, cache, loader, sampling, scan, synthetic, video
from svi_jax.data.config import default_config

H, W = 32, 48


def coded_frames(t, h=H, w=W, offset=0):
    """Frame k is one flat colour encoding its index: R = 10 + 6k, B = 255 - 6k (survives h264)."""
    k = np.arange(offset, offset + t)
    f = np.zeros((t, h, w, 3), np.uint8)
    f[..., 0] = (10 + 6 * k)[:, None, None]
    f[..., 1] = 128
    f[..., 2] = (255 - 6 * k)[:, None, None]
    return f


def frame_ids(frames):
    """Inverse of coded_frames on decoded (possibly cropped/resized) float or uint8 frames."""
    frames = np.asarray(frames, np.float32)
    if frames.min() < 0:
        frames = (frames + 1) * 127.5
    return np.rint((frames[..., 0].mean(axis=(-1, -2)) - 10) / 6).astype(int)


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_bad_files(folder, good_bytes):
    """The usual suspects; returns {file name: expected skip reason}."""
    os.makedirs(folder, exist_ok=True)
    expect = {}
    with open(os.path.join(folder, "truncated.mp4"), "wb") as f:  # moov atom at the end: cut off
        f.write(good_bytes[: len(good_bytes) // 2])
    expect["truncated.mp4"] = "unreadable"
    b = bytearray(good_bytes)
    for i in range(len(b) // 3, len(b) // 3 + 300):
        b[i] ^= 0x5A
    with open(os.path.join(folder, "corrupt.mp4"), "wb") as f:  # frames damaged in the middle
        f.write(bytes(b))
    expect["corrupt.mp4"] = "decode_error"
    open(os.path.join(folder, "zero.mp4"), "wb").close()
    expect["zero.mp4"] = "empty_file"
    with open(os.path.join(folder, "notes.mp4"), "w") as f:
        f.write("this is a text file renamed to .mp4\n" * 20)
    expect["notes.mp4"] = "unreadable"
    video.write_video(os.path.join(folder, "short.mp4"), coded_frames(2))
    expect["short.mp4"] = "too_few_frames"
    video.write_video(os.path.join(folder, "tiny.mp4"), coded_frames(12, 4, 6))
    expect["tiny.mp4"] = "too_small"
    return expect


@pytest.fixture(scope="module")
def good_mp4(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("vid") / "good.mp4")
    video.write_video(p, coded_frames(20))
    return p


# ---------------------------------------------------------------------------------------------- video


def test_probe_good_and_bad(good_mp4, tmp_path):
    info = video.probe_video(good_mp4)
    assert (info.num_frames, info.height, info.width, info.fps) == (20, H, W, 16.0)
    assert info.decode_errors == 0 and not info.grayscale
    expect = make_bad_files(str(tmp_path), open(good_mp4, "rb").read())
    for name, reason in expect.items():
        p = str(tmp_path / name)
        if reason in ("too_few_frames", "too_small", "decode_error"):
            i = video.probe_video(p)  # readable; the builder's limits reject it
            assert (i.num_frames < 5) if reason == "too_few_frames" else True
            assert (min(i.height, i.width) < 16) if reason == "too_small" else True
            assert (i.decode_errors > 0) if reason == "decode_error" else True
        else:
            with pytest.raises(video.VideoError) as e:
                video.probe_video(p)
            assert e.value.reason == reason, name
    with pytest.raises(video.VideoError) as e:
        video.probe_video(str(tmp_path / "absent.mp4"))
    assert e.value.reason == "missing_file"


def test_odd_and_grayscale_decode(tmp_path):
    odd = str(tmp_path / "odd.mp4")
    video.write_video(odd, coded_frames(8, 33, 47), pix_fmt="yuv444p")
    i = video.probe_video(odd)
    assert (i.height, i.width, i.num_frames) == (33, 47, 8)
    frames = video.decode_all(odd)
    assert frames.shape == (8, 33, 47, 3)
    np.testing.assert_array_equal(frame_ids(frames), np.arange(8))
    gray = (np.random.default_rng(0).random((6, H, W)) * 255).astype(np.uint8)
    gp = str(tmp_path / "gray.mkv")
    video.write_video(gp, gray, pix_fmt="gray", codec="ffv1")
    gi = video.probe_video(gp)
    assert gi.grayscale
    g = video.decode_all(gp)
    assert g.shape == (6, H, W, 3)
    np.testing.assert_array_equal(g[..., 0], gray)
    np.testing.assert_array_equal(g[..., 2], gray)


def test_decode_window_seek_stride_crop(tmp_path):
    p = str(tmp_path / "long.mp4")
    video.write_video(p, coded_frames(40))
    for start, stride in [(0, 1), (7, 1), (13, 3), (25, 2)]:
        a = video.decode_frames(p, start=start, count=6, stride=stride, fps=16.0, src_size=(H, W))
        b = video.decode_frames(p, start=start, count=6, stride=stride, seek=False, src_size=(H, W))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(frame_ids(a), start + stride * np.arange(6))
    # crop + resize inside ffmpeg agrees with PIL's bilinear on the same crop
    from PIL import Image

    rng = np.random.default_rng(0)
    tex = (rng.random((3, H, W, 3)) * 255).astype(np.uint8)
    tex = np.asarray([np.asarray(Image.fromarray(t).resize((W * 4, H * 4), Image.BICUBIC)) for t in tex])
    tp = str(tmp_path / "tex.mp4")
    video.write_video(tp, tex)
    x, y, w, h = 11, 5, 150, 90
    got = video.decode_frames(tp, start=0, count=3, crop=(x, y, w, h), size=(30, 50))
    ref = np.asarray([np.asarray(Image.fromarray(t).crop((x, y, x + w, y + h)).resize((50, 30), Image.BILINEAR))
                      for t in video.decode_all(tp)])
    assert got.shape == (3, 30, 50, 3)
    assert np.abs(got.astype(int) - ref).mean() < 0.5


# ---------------------------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def official(tmp_path_factory, good_mp4):
    """Official layout: two categories with CSVs, broken files, a missing file, a non-UTF-8 caption."""
    root = tmp_path_factory.mktemp("official")
    vids = root / "videos"
    (vids / "walk").mkdir(parents=True)
    (vids / "sky").mkdir()
    good = open(good_mp4, "rb").read()
    video.write_video(str(vids / "walk" / "w1.mp4"), coded_frames(40))
    video.write_video(str(vids / "walk" / "w2.MP4"), coded_frames(24, offset=5))
    video.write_video(str(vids / "walk" / "odd.mov"), coded_frames(16, 33, 47), pix_fmt="yuv444p")
    video.write_video(str(vids / "sky" / "s1.mp4"), coded_frames(30))
    video.write_video(str(vids / "sky" / "uncaptioned.mkv"), coded_frames(10), codec="ffv1", pix_fmt="bgr0")
    gray = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None] * 20, H, 1).repeat(W, 2)
    video.write_video(str(vids / "sky" / "gray.mkv"), gray, codec="ffv1", pix_fmt="gray")
    (vids / "sky" / "readme.txt").write_text("not a video")
    bad = make_bad_files(str(vids / "walk"), good)
    rows = [("w1.mp4", "a person walks"), ("w2.MP4", "  another walk  "), ("odd.mov", "odd sized"),
            ("gone.mp4", "named but missing"), ("", "no file name"), ("w1.mp4", "a person walks (dup)")]
    rows += [(n, f"broken {n}") for n in bad]
    write_csv(vids / "walk" / "walk.csv", ["Filename", "Video Description"], rows)
    with open(vids / "sky" / "sky.csv", "wb") as f:
        f.write(b"Filename,Video Description\ns1.mp4,caf\xe9 sky\ngray.mkv,grey clouds\n")  # latin-1 byte
    out = root / "ds"
    summary = builder.build_dataset(str(vids), str(out), progress=False)
    return dict(videos=vids, out=out, summary=summary, bad=bad)


def test_build_summary_counts_every_skip(official):
    s = official["summary"]
    assert s["layout"] == "categories"
    expected_skips = collections.Counter(official["bad"].values())
    expected_skips.update({"missing_file": 1, "caption_not_utf8": 1})
    assert s["skipped"] == dict(expected_skips)
    assert s["kept"] == 5  # w1, w2, odd, uncaptioned, gray
    assert s["kept"] + s["skipped_total"] == s["candidates"]
    assert s["notes"]["fallback_caption"] == 1 and s["notes"]["grayscale"] == 1
    assert s["notes"]["csv_empty_row"] == 1 and s["notes"]["csv_duplicate_row"] == 1
    assert s["notes"]["ignored_files"] == 1
    assert s["categories"] == {"sky": 2, "walk": 3}
    on_disk = json.load(open(official["out"] / builder.SUMMARY_FILE))
    assert on_disk["skipped"] == s["skipped"]
    files = {d["file"]: d["reason"] for d in on_disk["skipped_files"]}
    assert files["walk/gone.mp4"] == "missing_file" and files["sky/s1.mp4"] == "caption_not_utf8"


def test_build_read_back_round_trip(official):
    src = builder.open_dataset(str(official["out"]))
    assert len(src) == 5
    recs = {src[i]["key"].decode(): src[i] for i in range(len(src))}
    assert set(recs) == {"walk/w1.mp4", "walk/w2.MP4", "walk/odd.mov", "sky/uncaptioned.mkv", "sky/gray.mkv"}
    w1 = recs["walk/w1.mp4"]
    assert w1["video"] == open(official["videos"] / "walk" / "w1.mp4", "rb").read()
    assert int(w1["num_frames"]) == 40 and (int(w1["height"]), int(w1["width"])) == (H, W)
    assert w1["caption"].decode() == "a person walks (dup)"  # the last duplicate row wins, as dict() does
    assert recs["walk/w2.MP4"]["caption"].decode() == "another walk"
    assert recs["sky/uncaptioned.mkv"]["caption"].decode() == "A video from sky category"
    assert (int(recs["walk/odd.mov"]["height"]), int(recs["walk/odd.mov"]["width"])) == (33, 47)
    # a rebuild into the same folder needs overwrite
    with pytest.raises(FileExistsError):
        builder.build_dataset(str(official["videos"]), str(official["out"]), progress=False)


def test_caption_error_policies(official, tmp_path):
    s = builder.build_dataset(str(official["videos"]), str(tmp_path / "o"), caption_errors="cp1252",
                              progress=False)
    assert "caption_not_utf8" not in s["skipped"] and s["kept"] == 6
    src = builder.open_dataset(str(tmp_path / "o"))
    caps = {src[i]["key"].decode(): src[i]["caption"].decode() for i in range(len(src))}
    assert caps["sky/s1.mp4"] == "café sky"
    notes = collections.Counter()
    rows = scan.read_caption_csv(str(official["videos"] / "sky" / "sky.csv"), caption_errors="replace",
                                 notes=notes)
    assert rows["s1.mp4"] == "caf\ufffd sky" and notes["caption_recovered_replace"] == 1


def test_flat_folder_with_caption_csv(tmp_path):
    v = tmp_path / "flat"
    (v / "sub").mkdir(parents=True)
    video.write_video(str(v / "a.mp4"), coded_frames(12))
    video.write_video(str(v / "sub" / "b.mp4"), coded_frames(12))
    video.write_video(str(v / "c.mp4"), coded_frames(12))
    write_csv(tmp_path / "caps.csv", ["clip", "text", "other"],
              [("a.mp4", "first", "x"), ("b.mp4", "second (by base name)", "y"), ("nope.mp4", "missing", "z")])
    s = builder.build_dataset(str(v), str(tmp_path / "ds"), captions=str(tmp_path / "caps.csv"),
                              file_column="clip", caption_column="text", progress=False)
    assert s["layout"] == "flat" and s["kept"] == 2
    assert s["skipped"] == {"missing_file": 1, "no_caption": 1}
    src = builder.open_dataset(str(tmp_path / "ds"))
    assert {src[i]["key"].decode(): src[i]["caption"].decode() for i in range(2)} == {
        "a.mp4": "first", "sub/b.mp4": "second (by base name)"}


@pytest.mark.parametrize("content, match", [
    (b"", "is empty; expected a header row with columns 'Filename' and 'Video Description'"),
    (b"name,caption\na.mp4,hello\n", r"lacks \['Filename', 'Video Description'\]"),
    (b"Filename,Description\na.mp4,hello\n", r"lacks \['Video Description'\]"),
    (b"Filename,Video Description\n", "no usable row"),
    (b"Filename,Video Description\n,\n  ,  \n", "no usable row"),
    (b"\xff\xfeF\x00i\x00", "NUL bytes"),
])
def test_bad_csv_fails_at_once(tmp_path, content, match):
    v = tmp_path / "videos" / "cat"
    v.mkdir(parents=True)
    (v / "cat.csv").write_bytes(content)
    with pytest.raises(scan.CaptionError, match=match):
        builder.build_dataset(str(tmp_path / "videos"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_all_bad_videos_fail_clearly(tmp_path, good_mp4):
    bad = make_bad_files(str(tmp_path / "v" / "cat"), open(good_mp4, "rb").read())
    with pytest.raises(builder.NoUsableVideos, match="no usable video") as e:
        builder.build_dataset(str(tmp_path / "v"), str(tmp_path / "ds"), progress=False)
    assert e.value.summary["skipped"] == dict(collections.Counter(bad.values()))
    assert not (tmp_path / "ds" / builder.SUMMARY_FILE).exists()  # a failed build does not look built
    assert (tmp_path / "ds" / (builder.SUMMARY_FILE + ".failed")).exists()


def test_rotated_video_uses_display_size(tmp_path):
    import subprocess

    src, rot = str(tmp_path / "a.mp4"), str(tmp_path / "rot.mp4")
    video.write_video(src, coded_frames(10))
    subprocess.run([video.ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", src, "-c", "copy", rot],
                   check=True)
    i = video.probe_video(rot)
    assert (i.height, i.width) == (W, H)
    assert video.decode_all(rot).shape == (10, W, H, 3)
    assert video.decode_frames(rot, start=2, count=3, fps=i.fps, crop=(0, 0, H, W), size=(12, 8)).shape == (3, 12, 8, 3)


def test_cli_build_and_errors(tmp_path, capsys, good_mp4):
    from svi_jax.data.__main__ import main

    v = tmp_path / "v"
    v.mkdir()
    os.link(good_mp4, v / "g.mp4")
    write_csv(tmp_path / "c.csv", ["file", "cap"], [("g.mp4", "good")])
    assert main(["build", "--videos", str(v), "--out", str(tmp_path / "ds"), "--captions", str(tmp_path / "c.csv"),
                 "--file-column", "file", "--caption-column", "cap", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "kept 1 of 1 videos" in out and os.path.exists(tmp_path / "ds" / "summary.json")
    assert main(["build", "--videos", str(v), "--out", str(tmp_path / "ds2"), "--captions",
                 str(tmp_path / "c.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has columns ['file', 'cap'] but lacks ['Filename', 'Video Description']" in err


# ---------------------------------------------------------------------------------------------- sampling


def test_window_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        total = int(rng.integers(1, 300))
        t = int(rng.integers(1, 90))
        ms = int(rng.integers(1, 4))
        start, stride, num_real = sampling.plan_window(total, t, ms, rng)
        assert 1 <= num_real <= t and 1 <= stride
        last = start + (num_real - 1) * stride
        assert 0 <= start and last < total
        if total >= ms * t + 5:  # long clip: full window, stride drawn from 1..ms, start <= total-cover-5
            assert num_real == t and stride <= ms and start <= max(0, total - stride * t - 5)
        elif total < t:  # short: from frame 0, every frame once, tail repeats
            assert (start, stride, num_real) == (0, 1, total)
    # stride is uniform over 1..frame_stride for long clips
    strides = collections.Counter(sampling.plan_window(1000, 10, 3, rng)[1] for _ in range(600))
    assert set(strides) == {1, 2, 3} and min(strides.values()) > 150


def test_crop_rules():
    rng = np.random.default_rng(1)
    for src_h, src_w in [(720, 1280), (1080, 1920), (480, 480), (33, 47), (1000, 300), (32, 48)]:
        for _ in range(50):
            x, y, w, h = sampling.plan_crop(src_h, src_w, 480, 832, rng)
            assert 0 <= x and x + w <= src_w and 0 <= y and y + h <= src_h
            if src_w * 480 / 832 <= src_h:  # width limits: shrink width by up to 1/14
                assert src_w - src_w // 14 <= w <= src_w and h == int(w * 480 / 832)
            else:
                assert src_h - src_h // 14 <= h <= src_h and w == int(h * 832 / 480)


def test_plan_motion_and_padding_rules():
    rng = np.random.default_rng(2)
    cfg = default_config(num_frames=21, height=16, width=16, num_motion_frames=5, p_motion=0.9, pad_mode="ref")
    plans = [sampling.plan_clip(100, 64, 64, cfg, rng) for _ in range(2000)]
    frac5 = np.mean([p.num_cond == 5 for p in plans])
    assert {p.num_cond for p in plans} == {1, 5} and 0.87 < frac5 < 0.93
    assert all(0 <= p.pad_frame < 21 for p in plans)
    shot = default_config(num_frames=21, num_motion_frames=1)
    assert all(sampling.plan_clip(100, 64, 64, shot, rng).num_cond == 1 for _ in range(50))
    zero = default_config(num_frames=21, pad_mode="zero")
    assert sampling.plan_clip(100, 64, 64, zero, rng).pad_frame == -1
    mix = default_config(num_frames=21, pad_mode="mix")
    frac_ref = np.mean([sampling.plan_clip(100, 64, 64, mix, rng).pad_frame >= 0 for _ in range(2000)])
    assert 0.45 < frac_ref < 0.55  # a fair coin per clip between 'ref' and 'zero'
    # assemble: cond = first num_cond frames, then the padding frame (ref) or zeros; short windows repeat
    frames = coded_frames(7, 8, 8)
    plan = sampling.ClipPlan(start=0, stride=1, num_real=7, num_frames=9, crop=(0, 0, 8, 8), num_cond=5, pad_frame=3)
    ex = sampling.assemble(frames, plan, "cap")
    assert ex["video"].shape == (9, 8, 8, 3) and ex["video"].dtype == np.float32
    assert ex["video"].min() >= -1 and ex["video"].max() <= 1
    np.testing.assert_array_equal(frame_ids(ex["video"]), [0, 1, 2, 3, 4, 5, 6, 6, 6])
    np.testing.assert_array_equal(frame_ids(ex["cond"]), [0, 1, 2, 3, 4, 3, 3, 3, 3])
    np.testing.assert_array_equal(ex["first_frame"], ex["video"][0])
    z = sampling.assemble(frames, plan.__class__(**{**plan.__dict__, "pad_frame": -1}), "cap")
    assert np.all(z["cond"][5:] == 0) and int(z["num_cond"]) == 5


# ---------------------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def coded_ds(tmp_path_factory):
    """Seven frame-coded videos of different lengths (one shorter than the window)."""
    root = tmp_path_factory.mktemp("coded")
    v = root / "v" / "clips"
    v.mkdir(parents=True)
    lengths = [40, 30, 25, 36, 12, 33, 28]
    for i, n in enumerate(lengths):
        video.write_video(str(v / f"c{i}.mp4"), coded_frames(n, 36, 44))
    write_csv(v / "clips.csv", ["Filename", "Video Description"], [(f"c{i}.mp4", f"clip {i}") for i in range(7)])
    builder.build_dataset(str(root / "v"), str(root / "ds"), progress=False)
    return str(root / "ds")


def small_cfg(**kw):
    base = dict(num_frames=17, height=16, width=24, frame_stride=2, batch_size=2, seed=3, num_workers=2,
                prefetch=2, num_motion_frames=5, pad_mode="ref")
    base.update(kw)
    return default_config(**base)


def test_loader_clips_follow_their_plan(coded_ds):
    cfg = small_cfg(num_workers=0)
    ld = loader.ClipLoader(coded_ds, cfg, host_id=0, num_hosts=1)
    for pos in range(8):
        epoch, index = ld.order(pos)
        ex = ld.example(pos)
        rec = ld.source[index]
        plan = sampling.plan_clip(int(rec["num_frames"]), 36, 44, cfg, np.random.default_rng([cfg.seed, epoch, index]))
        assert ex["video"].shape == (17, 16, 24, 3) and ex["cond"].shape == (17, 16, 24, 3)
        np.testing.assert_array_equal(frame_ids(ex["video"]), plan.source_indices())
        nc = int(ex["num_cond"])
        assert nc == plan.num_cond
        np.testing.assert_array_equal(ex["cond"][:nc], ex["video"][:nc])
        np.testing.assert_array_equal(ex["cond"][nc:], np.broadcast_to(ex["video"][plan.pad_frame], ex["cond"][nc:].shape))
        assert ex["caption"] == rec["caption"].decode()
    zero = loader.ClipLoader(coded_ds, small_cfg(num_workers=0, pad_mode="zero"), host_id=0, num_hosts=1)
    ex = zero.example(0)
    assert np.all(ex["cond"][int(ex["num_cond"]):] == 0)


def test_loader_deterministic_and_resumable(coded_ds, tmp_path):
    import orbax.checkpoint as ocp

    cfg = small_cfg()
    with loader.ClipLoader(coded_ds, cfg, host_id=0, num_hosts=1) as a, \
            loader.ClipLoader(coded_ds, cfg, host_id=0, num_hosts=1) as b:
        run_a = [next(a) for _ in range(6)]  # crosses the epoch boundary (7 examples, batch 2)
        run_b = [next(b) for _ in range(6)]
        for x, y in zip(run_a, run_b):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        seen = np.concatenate([r["index"] for r in run_a])
        assert sorted(seen[:7]) == list(range(7))  # the first epoch is a permutation of all examples
        state = a.get_state()
        peeked = a.peek()
        expected = [next(a) for _ in range(3)]
    for k in peeked:
        np.testing.assert_array_equal(peeked[k], expected[0][k])
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(1, args=ocp.args.Composite(data=ocp.args.JsonSave(state)))
    mngr.wait_until_finished()
    restored = mngr.restore(1, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    with loader.ClipLoader(coded_ds, cfg, host_id=0, num_hosts=1) as c:
        c.set_state(restored)
        for e in expected:
            got = next(c)
            for k in e:
                np.testing.assert_array_equal(got[k], e[k])
    assert loader.state_from_array(loader.state_to_array(state)) == state
    with loader.ClipLoader(coded_ds, small_cfg(seed=4), host_id=0, num_hosts=1) as d:
        with pytest.raises(ValueError, match="seed"):
            d.set_state(state)
        other = np.concatenate([next(d)["index"] for _ in range(3)])
    assert not np.array_equal(other, seen[:6])


@pytest.mark.parametrize("n, hosts", [(7, 3), (7, 1), (10, 4), (5, 5)])
def test_shard_order_covers_every_example_once(n, hosts):
    for epoch in range(3):
        shards = [loader.ShardOrder(n, 11, h, hosts).epoch_indices(epoch) for h in range(hosts)]
        allidx = np.concatenate(shards)
        assert sorted(allidx.tolist()) == list(range(n))
        for h in range(hosts):  # positions map onto the same indices
            o = loader.ShardOrder(n, 11, h, hosts)
            got = [o(epoch * o.shard_size + k) for k in range(o.shard_size)]
            assert [g[1] for g in got] == shards[h].tolist() and all(g[0] == epoch for g in got)
    with pytest.raises(ValueError):
        loader.ShardOrder(2, 0, 0, 3)


@pytest.mark.parametrize("n, hosts, block", [(16, 2, 4), (16, 4, 2), (11, 2, 2), (9, 3, 2)])
def test_global_batch_is_the_one_host_batch(n, hosts, block):
    """Hosts take blocks of their batch: host 0's batch ++ host 1's ... is the one-host batch of the same global
    size (N a multiple of the global batch), and an epoch still covers every example once for any N."""
    orders = [loader.ShardOrder(n, 11, h, hosts, block=block) for h in range(hosts)]
    for epoch in range(2):
        assert sorted(np.concatenate([o.epoch_indices(epoch) for o in orders]).tolist()) == list(range(n))
    if n % (hosts * block) == 0:
        one = loader.ShardOrder(n, 11, 0, 1, block=hosts * block)
        for k in range(2 * n // (hosts * block)):
            glob = [orders[h](k * block + j) for h in range(hosts) for j in range(block)]
            assert glob == [one(k * hosts * block + j) for j in range(hosts * block)]


def test_multi_host_loaders_split_an_epoch(coded_ds):
    cfg = small_cfg(batch_size=2, num_workers=1)
    seen = []
    firsts = {}
    for h in range(2):
        with loader.ClipLoader(coded_ds, cfg, host_id=h, num_hosts=2) as ld:
            assert ld.batch_size == 1  # global batch 2 over 2 hosts
            for _ in range(ld.order.shard_size):
                b = next(ld)
                seen.append(int(b["index"][0]))
                firsts.setdefault(int(b["index"][0]), b["video"][0])
    assert sorted(seen) == list(range(7))
    # the augmentation of an example does not depend on the host layout
    with loader.ClipLoader(coded_ds, small_cfg(num_workers=0), host_id=0, num_hosts=1) as one:
        for pos in range(7):
            ex = one.example(pos)
            np.testing.assert_array_equal(ex["video"], firsts[int(ex["index"])])
    with pytest.raises(ValueError, match="divisible"):
        loader.ClipLoader(coded_ds, small_cfg(batch_size=3), host_id=0, num_hosts=2)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_sequences():
    a = synthetic.make_sequence("chelsea", 24, 32, 32, seed=5, motion="orbit")
    assert a.shape == (24, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic.make_sequence("chelsea", 24, 32, 32, seed=5, motion="orbit"))
    np.testing.assert_array_equal(a[:10], synthetic.make_sequence("chelsea", 10, 32, 32, seed=5, motion="orbit"))
    np.testing.assert_array_equal(a[8:20], synthetic.make_sequence("chelsea", 12, 32, 32, seed=5, motion="orbit",
                                                                   start=8))
    b = synthetic.make_sequence("chelsea", 24, 32, 32, seed=6, motion="orbit")
    assert np.abs(a.astype(int) - b).mean() > 5
    # smooth motion: consecutive frames are far closer than frames 12 apart, and the video does move
    d1 = np.abs(np.diff(a.astype(int), axis=0)).mean()
    d12 = np.abs(a[12:].astype(int) - a[:-12]).mean()
    assert 0.3 < d1 < d12 / 2
    for name in synthetic.BACKGROUNDS:
        assert synthetic.load_image(name).shape[-1] == 3
    g = synthetic.make_sequence("coffee", 6, 16, 24, seed=0, motion="pan", sprite="gif")
    assert g.shape == (6, 16, 24, 3)


def test_synthetic_dataset_builds(tmp_path):
    specs = synthetic.write_dataset(str(tmp_path / "v"), num_videos=5, num_frames=17, height=32, width=48, seed=1)
    assert len(specs) == 5
    for m in {s.motion for s in specs}:
        rows = list(csv.DictReader(open(tmp_path / "v" / m / f"{m}.csv", encoding="utf-8")))
        assert {r["Filename"] for r in rows} == {os.path.basename(s.file) for s in specs if s.motion == m}
    s = builder.build_dataset(str(tmp_path / "v"), str(tmp_path / "ds"), progress=False)
    assert s["kept"] == 5 and s["skipped_total"] == 0 and "fallback_caption" not in s["notes"]
    # the clip on disk is the (lightly compressed) ground truth
    spec = specs[0]
    truth = synthetic.make_sequence(spec.image, 17, 32, 48, spec.seed, motion=spec.motion, sprite=spec.sprite)
    got = video.decode_all(str(tmp_path / "v" / spec.file))
    assert got.shape == truth.shape and np.abs(got.astype(int) - truth).mean() < 4


# ---------------------------------------------------------------------------------------------- cache


def _standin_encoders(i2v=True):
    def enc_video(x):  # [B,T,H,W,3] -> [B, 1+(T-1)/4, H/8, W/8, 4]
        x = np.asarray(x)
        first = x[:, :1]
        rest = x[:, 1:].reshape(x.shape[0], -1, 4, *x.shape[2:]).mean(2)
        z = np.concatenate([first, rest], 1)
        b, f, h, w, c = z.shape
        z = z.reshape(b, f, h // 8, 8, w // 8, 8, c).mean((3, 5))
        return np.concatenate([z, z[..., :1]], -1)

    def enc_text(caps):
        L, D = 8, 6
        emb = np.zeros((len(caps), L, D), np.float32)
        mask = np.zeros((len(caps), L), np.int32)
        for i, c in enumerate(caps):
            n = min(len(c.split()), L)
            emb[i, :n] = np.arange(n * D).reshape(n, D) + len(c)
            mask[i, :n] = 1
        return emb, mask

    def enc_image(x):
        return np.asarray(x).reshape(x.shape[0], -1, 3)[:, :5]

    return cache.Encoders(video=enc_video, text=enc_text, image=enc_image if i2v else None,
                          description={"kind": "stand-in"})


def test_latent_cache_round_trip(coded_ds, tmp_path):
    cfg = small_cfg(num_frames=17, height=16, width=24, batch_size=2, num_workers=1)
    enc = _standin_encoders()
    out = str(tmp_path / "cache")
    for shard in range(2):  # written as two shards (e.g. by two hosts)
        info = cache.write_cache(coded_ds, out, enc, cfg, windows=2, batch_size=2, dtype="float32",
                                 shard=shard, num_shards=2, progress=False)
    assert info["shapes"]["latents"] == [5, 2, 3, 4] and info["shapes"]["y"] == [5, 2, 3, 8]
    clips = loader.ClipLoader(coded_ds, cfg, host_id=0, num_hosts=1, num_workers=0)
    lat = cache.LatentLoader(out, cfg, host_id=0, num_hosts=1)
    for pos in range(10):  # crosses into epoch 1 -> window 1
        epoch, index = lat.order(pos)
        got = lat.example(pos)
        ref = clips.load(epoch % 2, index)
        np.testing.assert_allclose(got["latents"], enc.video(ref["video"][None])[0], rtol=1e-6)
        z = enc.video(ref["cond"][None])[0]
        np.testing.assert_allclose(got["y"][..., 4:], z, rtol=1e-6)
        assert np.all(got["y"][0, ..., :4] == 1) and np.all(got["y"][1:, ..., :4] == 0)
        emb, mask = enc.text([ref["caption"]])
        n = int(mask.sum())
        assert int(got["context_len"]) == n and got["context"].shape == (8, 6)
        np.testing.assert_array_equal(got["context"][:n], emb[0, :n])
        assert np.all(got["context"][n:] == 0)
        assert got["caption"] == ref["caption"] and int(got["window"]) == epoch % 2
    # batches, state and resume as the clip loader
    b0 = [next(lat) for _ in range(3)]
    st = lat.get_state()
    nxt = next(lat)
    lat2 = cache.LatentLoader(out, cfg, host_id=0, num_hosts=1)
    lat2.set_state(st)
    again = next(lat2)
    assert b0[0]["latents"].shape == (2, 5, 2, 3, 4) and b0[0]["clip_fea"].shape == (2, 5, 3)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], again[k])
    lat.close()
    lat2.close()
    with pytest.raises(ValueError, match="num_frames"):
        cache.LatentLoader(out, small_cfg(num_frames=9))


def test_record_pack_bfloat16():
    import ml_dtypes

    rec = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16), "s": "tëxt",
           "i": np.int32(7)}
    back = cache.unpack(cache.pack(rec))
    assert back["a"].dtype == ml_dtypes.bfloat16 and back["s"] == "tëxt" and int(back["i"]) == 7
    np.testing.assert_array_equal(back["a"].astype(np.float32), rec["a"].astype(np.float32))


def test_npy_byte_fields_read_back_without_a_copy():
    """The builder's ``.npy`` fields (Talk audio features) read back exactly, as a read-only view of the record's
    bytes (a clip takes only its windows of a long video's features); other layouts fall back to ``np.load``."""
    import io

    from svi_jax.data.builder import _npy_bytes, npy_from_bytes

    a = np.random.default_rng(0).standard_normal((11, 3, 5)).astype(np.float32)
    data = _npy_bytes(a)
    v = npy_from_bytes(np.array(data, dtype=object))
    np.testing.assert_array_equal(v, a)
    assert not v.flags.writeable and v.base is not None
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(a))
    np.testing.assert_array_equal(npy_from_bytes(buf.getvalue()), a)
