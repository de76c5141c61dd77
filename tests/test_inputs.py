"""Bad or unusual inputs: images of every mode, tiny references, long prompts, one-line CLI errors (issue 19)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from svi_jax import cli, images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_16bit_grey_png_keeps_its_values(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)   # 0 .. 64491
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = images.load_rgb(str(tmp_path / "g16.png"))
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert got.shape == (48, 64, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert abs(got.mean() - want.mean()) < 1e-9 and got.mean() < 200          # not clipped to near-white


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "RGBA", "1", "F"])
def test_other_modes_convert_to_rgb(tmp_path, mode):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (200, 40, 90)
    rgb[:, 12:] = (10, 220, 30)
    src = Image.fromarray(rgb)
    if mode == "F":
        img = Image.fromarray((rgb[..., 0] / 255.0).astype(np.float32), "F")
        want = rgb[..., 0]
    elif mode == "1":
        img = Image.fromarray(rgb[..., 1] > 128)
        want = np.where(rgb[..., 1] > 128, 255, 0)
    else:
        img = src.convert(mode) if mode != "P" else src.quantize(4)
        want = np.asarray(img.convert("RGB"))
    ext = "tiff" if mode in ("CMYK", "F") else "png"
    img.save(tmp_path / f"x.{ext}")
    got = images.load_rgb(str(tmp_path / f"x.{ext}"))
    assert got.shape == (16, 24, 3) and got.dtype == np.uint8
    if want.ndim == 2:
        assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want)
    else:
        assert np.array_equal(got, want)
    if mode in ("P", "RGBA"):
        assert np.array_equal(got, rgb)


def test_small_reference_warns_and_bad_files_are_named(tmp_path, caplog):
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "small.png")
    caplog.set_level(logging.WARNING, logger="svi_jax")
    out = images.load_image(str(tmp_path / "small.png"), 64, 96)
    assert out.shape == (64, 96, 3) and "small.png is 8x8, much smaller than the output 96x64" in caplog.text
    open(tmp_path / "text.png", "w").write("not an image")
    with pytest.raises(images.ImageError, match="text.png is not an image file"):
        images.load_rgb(str(tmp_path / "text.png"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.png")
    raw = open(tmp_path / "full.png", "rb").read()
    open(tmp_path / "cut.png", "wb").write(raw[: len(raw) // 2])
    with pytest.raises(images.ImageError, match="cut.png is damaged or truncated"):
        images.load_rgb(str(tmp_path / "cut.png"))
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000                                   # 64x64 = 4096 px > 2 x 1000
    try:
        with pytest.raises(images.ImageError, match=r"full.png is 0.0 MP, above PIL's safety limit of 0.0 MP"):
            images.load_rgb(str(tmp_path / "full.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_long_prompt_warns_with_its_token_count(caplog):
    from svi_jax.pipeline import ByteTokenizer
    from svi_jax.prompt_checks import warn_long_prompts

    tok = ByteTokenizer(16)
    caplog.set_level(logging.WARNING, logger="svi_jax")
    assert warn_long_prompts(tok, ["short", "x" * 40, "x" * 40]) == [1]
    assert "prompt 1 is 41 tokens, longer than the text encoder's text_len 16: the last 25 tokens are cut" \
        in caplog.text
    assert tok.text_len == 16


def test_guard_one_line_and_exit_codes(capsys):
    def bad_value():
        raise ValueError("config.data.batch_size: must be >= 1\nsecond line")

    assert cli.guard(bad_value) == 2
    err = capsys.readouterr().err
    assert err == "error: config.data.batch_size: must be >= 1; second line\n"

    def unsafe():
        raise RuntimeError("Weights only load failed. ... you can set `weights_only=False` ...")

    assert cli.guard(unsafe) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only=False" not in err and "--debug" in err
    with pytest.raises(RuntimeError):
        cli.guard(unsafe, debug=True)

    def missing(argv):
        assert argv == ["a"]                              # --debug is taken out
        raise FileNotFoundError(2, "No such file or directory", "/x/y")

    assert cli.run(missing, ["a"]) == 2 and capsys.readouterr().err == "error: /x/y: No such file or directory\n"
    with pytest.raises(FileNotFoundError):
        cli.run(missing, ["a", "--debug"])


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=600)


def test_cli_bad_inputs_give_one_line_and_exit_2(tmp_path):
    from svi_jax.data.__main__ import main as data_main
    from svi_jax.eval.drift import main as drift_main

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    r = _cli("-m", "svi_jax.train", "--config", tiny, "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.strip() == "error: config.optim.lrr: unknown key; did you mean config.optim.lr?"
    open(tmp_path / "ref.png", "w").write("not an image")
    r = _cli("-m", "svi_jax.sample", "--config", tiny, "--image", str(tmp_path / "ref.png"), "--prompt", "a cat",
             "--out", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'ref.png'} is not an image file PIL can read (PNG, JPEG, WebP, ...)", r.stderr
    r = _cli("-m", "svi_jax.sample", "--config", tiny, "--image", str(tmp_path / "ref.png"), "--prompt", "",
             "--out", str(tmp_path / "o.mp4"))
    assert r.returncode == 2 and "error: --prompt is empty" in r.stderr
    # argparse tools, in process
    assert cli.run(data_main, ["build", "--videos", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 2
    assert cli.run(drift_main, ["--video", str(tmp_path / "none.mp4"), "--reference", str(tmp_path / "ref.png"),
                                "--out", str(tmp_path / "dr")]) == 2


def test_data_notes_blank_csv_rows_and_the_configured_clip_length(tmp_path):
    import collections
    from types import SimpleNamespace

    from svi_jax.data import builder, scan

    p = tmp_path / "c.csv"
    p.write_text("Filename,Video Description\na.mp4,a cat\n\n,no name\nb.mp4,\n  ,  \nc.mp4,a dog\n")
    notes = collections.Counter()
    out = scan.read_caption_csv(str(p), notes=notes)
    assert out == {"a.mp4": "a cat", "c.mp4": "a dog"} and notes["csv_empty_row"] == 4
    rep = builder._Report(SimpleNamespace(notes={}, entries=[]), clip_frames=17)
    entry = SimpleNamespace(category="x", caption_source="csv")
    for n in (9, 17, 33):
        rep.keep(entry, SimpleNamespace(num_frames=n, width=8, height=8, grayscale=False), 10)
    assert dict(rep.notes) == {"shorter_than_17_frames": 1}


def test_parts_folder_is_cleaned_of_superseded_files(tmp_path):
    from svi_jax.sample import Output

    o = Output(str(tmp_path / "v.mp4"))
    os.makedirs(o.parts)
    names = ["state.json", "seg_00000.mp4", "seg_00001.mp4", "seg_00001.npz", "seg_00002.mp4", "tail_00000.mp4",
             "tail_00001.mp4", "tail_00001.npz", "carry_00001.npz", "carry_00002.npz", ".tail_00002.mp4.ab12.tmp.mp4",
             ".state.json.x.tmp.json"]
    for n in names:
        open(os.path.join(o.parts, n), "w").close()
    removed = o.clean(2)                 # clips 0, 1 committed: next clip 2
    assert sorted(os.listdir(o.parts)) == ["carry_00002.npz", "seg_00000.mp4", "seg_00001.mp4", "seg_00001.npz",
                                           "state.json", "tail_00001.mp4", "tail_00001.npz"]
    assert sorted(removed) == sorted([".state.json.x.tmp.json", ".tail_00002.mp4.ab12.tmp.mp4", "carry_00001.npz",
                                      "seg_00002.mp4", "tail_00000.mp4"])
