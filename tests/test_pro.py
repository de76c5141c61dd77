"""SVI 2.0 Pro sampling: y / mask construction and stitching vs a NumPy transcription of the official
``wan_video_svi_pro.py`` / ``inference_svi_2.0_pro.py`` (svi_wan22 branch), latent chaining, and kill + --resume of
a tiny Pro generation (identical frames)."""
from __future__ import annotations

import importlib.util
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

from svi_jax import sample as S
from svi_jax.pro import ProSampler, pro_y, stitch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE = os.path.join(ROOT, "tests", "sample_pause.py")    # the CLI pausing at CLIP:STEP (the test-only hook)
STEPS = 3


# ------------------------------------------------------------------------------------------------ transcription


def official_y(anchor_latent, prev_last_latent, num_frames, height, width, num_motion_latent=1):
    """``WanVideoUnit_ImageEmbedderVAE.process``, wan_video_svi_pro.py L486-531, in NumPy (torch layout: latents
    ``[C, F, h, w]``, y ``[1, 4 + C, F, h, w]``); ``height``/``width`` in pixels (the mask is at //8)."""
    is_first_clip = prev_last_latent is None                                       # L486
    total_latents = (num_frames - 1) // 4 + 1                                     # L502
    if is_first_clip:                                                              # L505-512
        padding_size = total_latents - anchor_latent.shape[1]
        padding = np.zeros((anchor_latent.shape[0], padding_size) + anchor_latent.shape[2:], np.float32)
        y = np.concatenate([anchor_latent, padding], axis=1)
    else:                                                                          # L513-522
        motion_latent = prev_last_latent[:, -num_motion_latent:]
        padding_size = total_latents - anchor_latent.shape[1] - motion_latent.shape[1]
        padding = np.zeros((anchor_latent.shape[0], padding_size) + anchor_latent.shape[2:], np.float32)
        y = np.concatenate([anchor_latent, motion_latent, padding], axis=1)
    msk = np.ones((1, num_frames, height // 8, width // 8), np.float32)           # L525-529
    msk[:, 1:] = 0
    msk = np.concatenate([np.repeat(msk[:, 0:1], 4, axis=1), msk[:, 1:]], axis=1)
    msk = msk.reshape(1, msk.shape[1] // 4, 4, height // 8, width // 8)
    msk = msk.transpose(0, 2, 1, 3, 4)[0]
    return np.concatenate([msk, y])[None]                                          # L531


def official_stitch(clips, num_overlap_frame):
    """inference_svi_2.0_pro.py L124-131."""
    all_video_frames = []
    for clip_idx, video_frames in enumerate(clips):
        if clip_idx == 0:
            all_video_frames.extend(video_frames)
        else:
            all_video_frames.extend(video_frames[num_overlap_frame:])
    return np.stack(all_video_frames)


@pytest.mark.parametrize("first", [True, False])
def test_y_and_mask_match_the_official_construction(first):
    r = np.random.RandomState(0)
    C, F, h, w, T = 16, 21, 6, 10, 81
    anchor = r.randn(C, 1, h, w).astype(np.float32)
    prev = None if first else r.randn(C, F, h, w).astype(np.float32)
    want = official_y(anchor, prev, T, 8 * h, 8 * w)                       # [1, 20, F, h, w]
    ours = pro_y(jnp.asarray(anchor.transpose(1, 2, 3, 0))[None],
                 None if first else jnp.asarray(prev.transpose(1, 2, 3, 0)[-1:])[None], T)
    np.testing.assert_array_equal(np.asarray(ours), want.transpose(0, 2, 3, 4, 1))
    assert np.asarray(ours)[0, 1:, :, :, :4].max() == 0 and np.asarray(ours)[0, 0, :, :, :4].min() == 1


@pytest.mark.parametrize("overlap", [4, 5])
def test_stitching_matches_the_official_script(overlap):
    r = np.random.RandomState(1)
    clips = [r.randint(0, 255, (9, 2, 3, 3)).astype(np.uint8) for _ in range(4)]
    np.testing.assert_array_equal(stitch(clips, overlap), official_stitch(clips, overlap))


# ------------------------------------------------------------------------------------------------ sampler


CONFIG = '''
from configs import pro_tiny


def get_config():
    c = pro_tiny.get_config("high")
    c.model.update(num_layers=1)
    c.data.update(num_frames=9, height=16, width=16)
    return c
'''


def _load_config(path):
    spec = importlib.util.spec_from_file_location(f"pro_test_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("pro")
    (d / "cfg.py").write_text(CONFIG)
    yy, xx = np.mgrid[0:16, 0:16]
    ref = np.stack([yy * 15, xx * 15, 255 - (yy + xx) * 7], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(ref).save(d / "ref.png")
    (d / "prompts.txt").write_text("a red boat\na blue car\n")
    config = _load_config(str(d / "cfg.py"))
    pro = ProSampler(config, num_steps=STEPS, cfg_scale=5.0, cfg_batch=False)
    return dict(dir=d, cfg=str(d / "cfg.py"), config=config, pro=pro, ref=S.load_image(str(d / "ref.png"), 16, 16))


def test_chaining_passes_the_latents_not_decoded_frames(env):
    pro, ref = env["pro"], env["ref"]
    st = pro.initial_state(ref)
    y0, clip = pro.conditioning(st, ref)
    assert clip is None and y0.shape == (1, 3, 8, 8, 52)
    assert float(jnp.abs(y0[0, 1:, ..., 4:]).max()) == 0.0                 # clip 0: anchor + zero latents
    lat = pro.sample("a", y0, None, 0)
    frames = pro.decode(lat)
    st1 = pro.next_state(st, frames, lat)
    y1, _ = pro.conditioning(st1, ref)
    np.testing.assert_array_equal(np.asarray(y1[0, 1, ..., 4:]), np.asarray(lat[0, -1]))   # the latent itself
    np.testing.assert_array_equal(np.asarray(y1[0, 0]), np.asarray(y0[0, 0]))                # the same anchor
    assert float(jnp.abs(y1[0, 2:, ..., 4:]).max()) == 0.0


def _cli(env, out, extra_env=None, resume=False, pause=None):
    run = [PAUSE, pause, out + ".paused"] if pause else ["-m", "svi_jax.sample"]
    cmd = [sys.executable, *run, f"--config={env['cfg']}", f"--image={env['dir'] / 'ref.png'}",
           f"--prompts={env['dir'] / 'prompts.txt'}", f"--out={out}", f"--num_steps={STEPS}", "--num_clips=3",
           "--cycle_prompts", "--lossless", "--noprogress", "--chain=pro", "--nocfg_batch",
           "--negative_prompt=" + S.NEGATIVE_PROMPT] + (["--resume"] if resume else [])
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(env["dir"] / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill_mid_clip_then_resume_gives_identical_frames(env, tmp_path):
    out = str(tmp_path / "pro.mp4")
    proc = _cli(env, out, pause="1:1")                             # clip 2 of 3 sleeps at its second step
    try:
        deadline = time.time() + 900
        while not os.path.exists(out + ".paused"):
            if proc.poll() is not None:
                raise AssertionError(f"sampler exited early: {proc.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, "the sampler never reached clip 2"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.load(open(out + ".parts/state.json"))["next_clip"] == 1
    proc = _cli(env, out, resume=True)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    T, ov = 9, 4
    assert json.loads(stdout.decode().strip().splitlines()[-1])["frames"] == T + 2 * (T - ov)
    got = S.Output(out).read_lossless()
    # the in-memory rollout: the same clips (seeds 0, 42, 84) stitched as the official script does
    want = env["pro"].rollout(env["ref"], ["a red boat", "a blue car", "a red boat"], seed=0)
    np.testing.assert_array_equal(got, want)
    side = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert [c["seed"] for c in side["clips"]] == [0, 42, 84] and side["settings"]["chain"] == "pro"
    assert side["first_clip_frames"] == T and side["total_frames"] == len(got)


def test_pro_cli_errors(env, tmp_path):
    """--lora with --chain pro, a non-Pro model: one error line, exit 2."""
    base = [sys.executable, "-m", "svi_jax.sample", f"--image={env['dir'] / 'ref.png'}", "--prompt=a",
            "--chain=pro", "--noprogress"]
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    cases = {"lora": base + [f"--config={env['cfg']}", f"--out={tmp_path / 'a.mp4'}", f"--lora={env['cfg']}"],
             "model": base + ["--config=configs/tiny.py", f"--out={tmp_path / 'b.mp4'}"]}
    for name, cmd in cases.items():
        p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, timeout=600)
        err = p.stderr.decode().strip().splitlines()
        assert p.returncode == 2, (name, p.stderr.decode()[-2000:])
        assert err[-1].startswith("error:"), (name, err[-3:])
        assert {"lora": "--lora_high", "model": "Wan2.2"}[name] in err[-1]


def test_schedule_with_chain_pro_sets_each_clip(env, tmp_path):
    """--schedule with --chain pro: per-clip prompt, seed, CFG, steps and the low expert's LoRA, against the clips
    made one by one with ProSamplers of those settings and stitched as the official script; a 'loras' field is
    refused (one line)."""
    from svi_jax import lora as lora_lib

    pro, ref = env["pro"], env["ref"]                      # clip 0: the flags' settings (CFG 5, STEPS steps)
    lora = lora_lib.init_lora(pro.params["low"], jax.random.key(3), rank=2)
    lora = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), lora)   # B != 0
    lora_lib.save(lora, str(tmp_path / "low.safetensors"))
    sched = tmp_path / "s.jsonl"
    sched.write_text('{"prompt": "a red boat"}\n{"prompt": "a blue car", "seed": 7, "cfg_scale": 1, "steps": 4, '
                     '"lora_low": "low.safetensors:0.5"}\n')
    out = str(tmp_path / "pro_sched.mp4")
    cmd = [sys.executable, "-m", "svi_jax.sample", f"--config={env['cfg']}", f"--image={env['dir'] / 'ref.png'}",
           f"--schedule={sched}", f"--out={out}", f"--num_steps={STEPS}", "--lossless", "--noprogress",
           "--chain=pro", "--nocfg_batch", "--negative_prompt=" + S.NEGATIVE_PROMPT]
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    got = S.Output(out).read_lossless()
    # 4 steps at shift 5: t = 1000, 938 (high expert), 833, 625 (low expert, with the clip's LoRA)
    other = ProSampler(env["config"], num_steps=4, cfg_scale=1.0, cfg_batch=False,
                       lora_low=str(tmp_path / "low.safetensors"), lora_low_scale=0.5)
    st = pro.initial_state(ref)
    y, _ = pro.conditioning(st, ref)
    lat0 = pro.sample("a red boat", y, None, 0)
    clip0 = pro.decode(lat0)
    st = pro.next_state(st, clip0, lat0)
    y, _ = other.conditioning(st, ref)
    lat1 = other.sample("a blue car", y, None, 7)
    np.testing.assert_array_equal(got, stitch([clip0, other.decode(lat1)], pro.overlap))
    no_lora = ProSampler(env["config"], num_steps=4, cfg_scale=1.0, cfg_batch=False)
    assert not np.array_equal(np.asarray(no_lora.sample("a blue car", y, None, 7)), np.asarray(lat1))  # it matters
    side = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert [c["seed"] for c in side["clips"]] == [0, 7] and [c["cfg_scale"] for c in side["clips"]] == [5.0, 1.0]
    assert [c["steps"] for c in side["clips"]] == [STEPS, 4]
    assert side["clips"][0]["lora_low"] is None and side["clips"][1]["lora_low"]["strength"] == 0.5

    sched.write_text('{"prompt": "a", "loras": ["x.safetensors"]}\n')
    p = subprocess.run(cmd[:-3] + ["--chain=pro", f"--out={tmp_path / 'c.mp4'}"], cwd=ROOT, env=e,
                       capture_output=True, timeout=600)
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and err[-1].startswith("error:") and "lora_high" in err[-1], err[-3:]
