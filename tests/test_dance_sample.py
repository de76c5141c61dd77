"""SVI-Dance sampling: pose windows vs the official loop, pose fitting vs torch, the pose in both CFG passes, and
kill + --resume of the dance CLI giving the same frames as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax import dance
from svi_jax import sample as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE = os.path.join(ROOT, "tests", "sample_pause.py")    # the CLI pausing at CLIP:STEP (the test-only hook)
CFG = os.path.join(ROOT, "configs", "dance_tiny.py")
T, H, W, STEPS = 9, 32, 48, 2


def official_windows(num_pose: int, num_clips: int, max_frames: int = 81, num_motion_frames: int = 1):
    """test_svi_dance.py L238-288 transcribed, on a stream whose frame i *is* the number i."""
    all_ = np.arange(num_pose)
    if all_.shape[0] < max_frames:
        repeat_times = (max_frames // all_.shape[0]) + 1
        all_ = np.concatenate([all_ for _ in range(repeat_times)])
    humanpose_data = all_[:max_frames]
    sampled_idx = max_frames - 1
    out = []
    for _ in range(num_clips):
        out.append(humanpose_data.copy())
        new = np.zeros(max_frames, np.int64)
        new[:num_motion_frames] = humanpose_data[-num_motion_frames:]
        for i in range(num_motion_frames, max_frames):
            sampled_idx = sampled_idx % all_.shape[0]
            new[i] = all_[sampled_idx]
            sampled_idx += 1
        humanpose_data = new
    return out


@pytest.mark.parametrize("n,T_,m", [(130, 81, 1), (30, 81, 1), (81, 81, 1), (400, 81, 1), (5, 9, 1), (13, 9, 2)])
def test_pose_windows_match_the_official_loop(n, T_, m):
    ours, _ = dance.pose_windows(n, 7, T_, m)
    ref = official_windows(n, 7, T_, m)
    for k, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"clip {k}")


def test_pose_windows_facts():
    w, cursors = dance.pose_windows(130, 4)
    assert list(w[0]) == list(range(81))
    assert list(w[1]) == [80, 80] + list(range(81, 130)) + list(range(30))       # pose 80 repeated at the seam
    assert list(w[2]) == [29] + list(range(30, 110))
    assert list(w[3]) == [109] + list(range(110, 130)) + list(range(60))
    assert cursors[:2] == [80, 30]


@pytest.mark.parametrize("src,dst", [((20, 30), (32, 48)), ((50, 30), (32, 48)), ((33, 47), (64, 32))])
def test_resize_and_pad_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    frames = np.random.default_rng(0).integers(0, 256, (3,) + src + (3,), dtype=np.uint8)
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    th, tw = dst                                     # utils/image_process.py resize_and_pad_to_target, verbatim
    s = min(th / src[0], tw / src[1])
    nh, nw = int(src[0] * s), int(src[1] * s)
    r = F.interpolate(t, size=(nh, nw), mode="nearest")
    pt, pl = (th - nh) // 2, (tw - nw) // 2
    ref = F.pad(r, (pl, tw - nw - pl, pt, th - nh - pt), mode="constant", value=0)
    np.testing.assert_array_equal(dance.resize_and_pad(frames, *dst), ref.permute(0, 2, 3, 1).numpy().astype(np.uint8))


def _load(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"dance_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """dance_tiny + a random adapter (LoRA + pose module) in our adapter dir, a reference image, 5 pose frames."""
    from PIL import Image

    from svi_jax import lora as lora_lib
    from svi_jax.convert.dance import save_adapter
    from svi_jax.train import load_frozen_params

    d = tmp_path_factory.mktemp("dance")
    config = _load(CFG)
    base = load_frozen_params(config, jax.random.key(int(config.train.seed)))
    lora = lora_lib.init_lora(base, jax.random.key(5), 4)
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(6), a.shape), lora)
    pose = jax.tree.map(lambda a: a * 3.0 + 0.01, base["dwpose_embedding"])
    save_adapter(str(d / "adapter"), lora, pose, {"rank": 4})
    yy, xx = np.mgrid[0:H, 0:W]
    Image.fromarray(np.stack([yy * 7, xx * 5, 255 - yy * 4], -1).clip(0, 255).astype(np.uint8)).save(d / "ref.png")
    os.makedirs(d / "poses")
    rng = np.random.default_rng(1)
    for i in range(5):                                 # a 5-frame pose stream: shorter than a clip -> tiled, loops
        img = np.zeros((24, 36, 3), np.uint8)
        y0, x0 = rng.integers(0, 16), rng.integers(0, 28)
        img[y0:y0 + 8, x0:x0 + 8] = rng.integers(50, 256, 3)
        Image.fromarray(img).save(d / "poses" / f"{i:03d}.png")
    return dict(dir=d, config=config)


def _sampler(env, **kw):
    stream = dance.PoseStream.from_path(str(env["dir"] / "poses"), T, H, W)
    return S.LongVideoSampler(env["config"], lora=str(env["dir"] / "adapter"), num_steps=STEPS, cfg_scale=2.0,
                              cfg_batch=False, streams=[stream], **kw), stream


def test_pose_is_kept_in_the_unconditional_pass(env):
    """The sampler's CFG vs the official two-pass loop with ``add_condition`` in both passes (cond_wo_pose)."""
    from svi_jax.models.dit import WanDiT
    from svi_jax.denoise import reference_sample

    s, stream = _sampler(env)
    ref_img = S.load_image(str(env["dir"] / "ref.png"), H, W)
    y, clip = s.conditioning(s.initial_state(ref_img), ref_img)
    extra, _ = s.extra_conditions(1)
    ctx, neg = s.encode_text("dance"), s.encode_text(s.negative_prompt)
    noise = s.noise(y, 3)
    got = s.sample_fn(s.params, noise, ctx, neg, clip, y, None, extra, extra)
    mod = WanDiT(s.dit_config)
    fwd = lambda x, t, c, cl, yy: mod.apply({"params": s.params}, x, t, c, clip_fea=cl, y=yy, extra=extra)  # noqa
    want = reference_sample(fwd, noise, STEPS, 5.0, 2.0, ctx, neg, clip, y)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    other = {"pose": jnp.zeros_like(extra["pose"])}
    assert not np.allclose(np.asarray(s.sample_fn(s.params, noise, ctx, neg, clip, y, None, other, other)),
                           np.asarray(got), atol=1e-3)                 # the pose drives the result


def _cli(env, out, extra_env=None, resume=False, pause=None):
    run = [PAUSE, pause, out + ".paused"] if pause else ["-m", "svi_jax.sample"]
    cmd = [sys.executable, *run, f"--config={CFG}", f"--image={env['dir'] / 'ref.png'}",
           f"--pose_dir={env['dir'] / 'poses'}", "--prompt=the person is dancing", f"--out={out}",
           f"--lora={env['dir'] / 'adapter'}", f"--num_steps={STEPS}", "--num_clips=3", "--keep_first_prompt",
           "--lossless", "--noprogress", "--nocfg_batch"] + (["--resume"] if resume else [])
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(env["dir"] / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_dance_cli_kill_then_resume_is_identical(env, tmp_path):
    s, _ = _sampler(env)
    ref_img = S.load_image(str(env["dir"] / "ref.png"), H, W)
    want = s.rollout(ref_img, ["the person is dancing"] * 3)            # uninterrupted, in memory
    out = str(tmp_path / "dance.mp4")
    proc = _cli(env, out, pause="1:1")                                  # clip 2 of 3 sleeps at its second step
    try:
        deadline = time.time() + 600
        while not os.path.exists(out + ".paused"):
            if proc.poll() is not None:
                raise AssertionError(f"sampler exited early: {proc.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, "the sampler never reached clip 2"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    st = json.load(open(out + ".parts/state.json"))
    assert st["next_clip"] == 1 and st["clips"][0]["pose_window"] == [0, 3] and st["clips"][0]["pose_cursor"] == 8
    assert st["settings"]["pose_frames"] == 5 and st["settings"]["cfg_scale"] == 2.0 and st["settings"]["fps"] == 25
    proc = _cli(env, out, resume=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    got = S.Output(out).read_lossless()
    assert got.shape == (3 * (T - 1) + 1, H, W, 3)
    np.testing.assert_array_equal(got, want)
    side = json.load(open(os.path.splitext(out)[0] + ".json"))
    # 5 poses tiled to 10: clip 1 = [8, 8, 9, 0, ...], cursor after clip 1 = 16 % 10 ...
    assert [c["pose_window"] for c in side["clips"]] == [[0, 3], [3, 0], [0, 3]]


def test_dance_cli_errors(env, tmp_path):
    out = str(tmp_path / "x.mp4")
    base = [f"--config={CFG}", f"--image={env['dir'] / 'ref.png'}", "--prompt=d", f"--out={out}"]
    for extra, msg in (([], "exactly one of --pose"), ([f"--pose={tmp_path / 'none.mp4'}"], "does not exist"),
                       ([f"--pose_dir={tmp_path}"], "holds no images")):
        r = subprocess.run([sys.executable, "-m", "svi_jax.sample"] + base + extra, cwd=ROOT, capture_output=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=300)
        assert r.returncode == 2 and msg in r.stderr.decode(), r.stderr.decode()[-2000:]
