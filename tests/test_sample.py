"""Long-video sampling: the jitted sampler (CFG, LoRA, UniPC), Shot/Film conditioning, stitching, prompt files,
and kill-then-resume giving the same video as an uninterrupted run.

Models: a tiny I2V DiT (1 block) and CLIP with random weights saved as checkpoints, a random tiny UMT5 with the byte
tokenizer, and the invertible patch "VAE" (so conditioning latents decode back to exactly the pixels encoded).
"""
from __future__ import annotations

import copy
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
from svi_jax import video_io
from svi_jax.conditioning import i2v_mask
from svi_jax.denoise import integrate, make_sampler, unipc_sigmas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE = os.path.join(ROOT, "tests", "sample_pause.py")    # the CLI pausing at CLIP:STEP (the test-only hook)
T, H, W = 9, 8, 8          # 9 frames -> 3 latent frames of 4x4 (patch 2); Film's 5 motion frames fit
STEPS = 3

CONFIG = '''
import ml_collections
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64, freq_dim=32, text_len=16, in_dim=2 * 48 + 4,
                   out_dim=48)
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=2, temporal=4, scale=0.5))
    c.erft.shift = 5.0          # the official sampling shift (the tiny config's base uses 1); the CLI defaults to it
    c.encoders.t5.update(text_len=16, num_layers=1)
    c.encoders.clip.update(num_layers=1)
    c.data.update(num_frames={T}, height={H}, width={W})
    c.checkpoints.dit = {dit!r}
    c.checkpoints.clip = {clip!r}
    return c
'''


def _load_config(path):
    spec = importlib.util.spec_from_file_location(f"sample_test_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Random tiny DiT + CLIP saved as checkpoints, the config file pointing at them, a reference image, prompts."""
    from flax.linen import meta

    from svi_jax.models import clip as clip_mod
    from svi_jax.models.dit import DiT, DiTConfig, init_params

    d = tmp_path_factory.mktemp("sample")
    bare = d / "bare.py"
    bare.write_text(CONFIG.format(T=T, H=H, W=W, dit="", clip=""))
    c = _load_config(str(bare))
    dcfg = DiTConfig.from_dict(c.model.to_dict())
    DiT(dcfg, jax.jit(lambda k: init_params(dcfg, k))(jax.random.key(1))).save(str(d / "dit"))
    ccfg = clip_mod.CLIPConfig.from_dict(c.encoders.clip.to_dict())
    cparams = jax.jit(lambda k: meta.unbox(clip_mod.CLIPVisionTower(ccfg).init(k, clip_mod._dummy(ccfg))["params"]))(
        jax.random.key(2))
    clip_mod.CLIPVision(ccfg, cparams).save(str(d / "clip"))
    cfg_path = d / "cfg.py"
    cfg_path.write_text(CONFIG.format(T=T, H=H, W=W, dit=str(d / "dit"), clip=str(d / "clip")))

    from PIL import Image

    yy, xx = np.mgrid[0:H, 0:W]
    ref = np.stack([yy * 30, xx * 30, 255 - (yy + xx) * 15], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(ref).save(d / "ref.png")
    (d / "prompts.txt").write_text("# a comment\nthe red boat sails\n\n  ünïcödé — 猫が走る  \n", encoding="utf-8")
    config = _load_config(str(cfg_path))
    shot = S.LongVideoSampler(config, num_steps=STEPS, cfg_scale=5.0)
    return dict(dir=d, cfg_path=str(cfg_path), config=config, shot=shot, ref=S.load_image(str(d / "ref.png"), H, W),
                prompts=S.load_prompts(str(d / "prompts.txt")))


def _inputs(env, num=1):
    s = env["shot"]
    st = s.initial_state(env["ref"])
    y, clip = s.conditioning(st, env["ref"])
    noise = s.noise(y, 0)
    ctx, neg = s.encode_text("a prompt"), s.encode_text(s.negative_prompt)
    return noise, ctx, neg, clip, y


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_files(tmp_path):
    assert S.parse_prompts("# c\n\n first \n#x\nsecond\n\n") == ["first", "second"]
    assert S.parse_prompts("ünï — 猫\n") == ["ünï — 猫"]
    official = 'prompts = ["A cat.",\n"A dog, running." ,  # comment\n  "Ein Bär — 熊"]\n'
    assert S.parse_prompts(official) == ["A cat.", "A dog, running.", "Ein Bär — 熊"]
    assert S.parse_prompts("# header\n[\n 'a',\n 'b',\n]\n") == ["a", "b"]
    with pytest.raises(S.PromptFileError, match="not a valid Python list"):
        S.parse_prompts('prompts = ["a", "b"\n')
    with pytest.raises(S.PromptFileError, match="not a valid Python list"):
        S.parse_prompts('prompts = ["a", open("x")]')          # never executed
    with pytest.raises(S.PromptFileError, match="item 1 is a int"):
        S.parse_prompts('prompts = ["a", 3]')
    with pytest.raises(S.PromptFileError, match="no prompts"):
        S.parse_prompts("# only a comment\n\n")
    p = tmp_path / "p.txt"
    p.write_bytes("line one\n# skip\nzwei — ü\n".encode("utf-8"))
    assert S.load_prompts(str(p)) == ["line one", "zwei — ü"]
    p.write_bytes(b"\xff\xfe bad")
    with pytest.raises(S.PromptFileError, match="not UTF-8"):
        S.load_prompts(str(p))
    with pytest.raises(S.PromptFileError, match="does not exist"):
        S.load_prompts(str(tmp_path / "missing.txt"))


def test_prompt_schedule_and_seeds():
    ps = ["a", "b", "c"]
    assert S.schedule_prompts(ps) == ps
    assert S.schedule_prompts(ps, repeat=2) == ["a", "a", "b", "b", "c", "c"]
    assert S.schedule_prompts(ps, num_clips=2, repeat=2) == ["a", "a"]
    assert S.schedule_prompts(ps, num_clips=5) == ps                       # capped, as the official script
    assert S.schedule_prompts(ps, num_clips=5, cycle=True) == ["a", "b", "c", "a", "b"]
    assert S.schedule_prompts(ps, num_clips=4, keep_first=True, prefix="P") == ["P, a"] * 4
    with pytest.raises(ValueError, match="needs --num_clips"):
        S.schedule_prompts(ps, keep_first=True)
    assert [S.clip_seed(0, k) for k in range(3)] == [0, 42, 84]            # official k * seed_times
    assert [S.clip_seed(5, k, 7) for k in range(3)] == [5, 12, 19]


# ------------------------------------------------------------------------------------------------ sampler


def reference_sample(forward, noise, num_steps, shift, cfg_scale, context, neg_context, clip_fea, y):
    """The official loop, written here (not shared with the sampler): Euler + CFG with two separate passes on the
    grid ``shift(linspace(1, 0, N + 1)[:-1]) ++ [0]``, ``t = 1000 sigma``."""
    s = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    grid = np.concatenate([shift * s / (1 + (shift - 1) * s), [0.0]])
    x = jnp.asarray(noise, jnp.float32)
    for i in range(num_steps):
        t = jnp.full((x.shape[0],), 1000.0 * grid[i], jnp.float32)
        vc = forward(x, t, context, clip_fea, y)
        v = vc
        if cfg_scale != 1.0:
            vu = forward(x, t, neg_context, clip_fea, y)
            v = vu + cfg_scale * (vc - vu)
        x = x + v * np.float32(grid[i + 1] - grid[i])
    return x


def test_cfg_matches_the_official_two_pass_loop(env):
    s = env["shot"]
    noise, ctx, neg, clip, y = _inputs(env)
    fwd = jax.jit(lambda x, t, c, cl, yy: _apply(s, x, t, c, cl, yy))
    ref1 = reference_sample(fwd, noise, STEPS, 5.0, 1.0, ctx, neg, clip, y)
    ref5 = reference_sample(fwd, noise, STEPS, 5.0, 5.0, ctx, neg, clip, y)
    f1 = make_sampler(s.dit_config, STEPS, 5.0, cfg_scale=1.0)
    out1 = f1(s.params, noise, ctx, neg, clip, y)
    np.testing.assert_allclose(out1, ref1, rtol=2e-5, atol=2e-5)            # CFG 1 = the conditional pass only
    out1b = f1(s.params, noise, ctx, ctx * 0 + 3.0, clip, y)
    np.testing.assert_array_equal(out1, out1b)                              # ... the negative prompt is unused
    assert s.cfg_batch is (jax.default_backend() != "cpu")                   # default: two passes on CPU
    for batch in (True, False):                                             # batched cond + uncond, two passes
        out5 = make_sampler(s.dit_config, STEPS, 5.0, cfg_scale=5.0, cfg_batch=batch)(s.params, noise, ctx, neg,
                                                                                       clip, y)
        np.testing.assert_allclose(out5, ref5, rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(out5 - out1))) > 1e-3                      # guidance does something here


def _apply(s, x, t, ctx, clip, y):
    from svi_jax.models.dit import WanDiT

    return WanDiT(s.dit_config).apply({"params": s.params}, x, t, ctx, clip_fea=clip, y=y)


def test_merged_lora_equals_unmerged(env):
    from svi_jax import lora as lora_lib
    from svi_jax.model_dirs import flatten, unflatten

    s = env["shot"]
    noise, ctx, neg, clip, y = _inputs(env)
    lora = lora_lib.init_lora(s.params, jax.random.key(5), rank=4)
    fl = flatten(lora)
    lora = unflatten({k: (0.05 * jax.random.normal(jax.random.key(len(k)), v.shape) if k.endswith("/b") else v)
                      for k, v in fl.items()})
    f = s.sample_fn                                                          # CFG 5, Euler
    unmerged = f(s.params, noise, ctx, neg, clip, y, lora=lora)
    merged = f(lora_lib.merge(s.params, lora, scale=s.dit_config.lora_scale), noise, ctx, neg, clip, y)
    base = f(s.params, noise, ctx, neg, clip, y)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(merged - base))) > 1e-3


def test_sampler_is_deterministic_for_a_seed(env):
    s = env["shot"]
    _, ctx, neg, clip, y = _inputs(env)
    a = s.sample("a prompt", y, clip, seed=7)
    b = s.sample("a prompt", y, clip, seed=7)
    c = s.sample("a prompt", y, clip, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_unipc_matches_diffusers():
    import torch
    from diffusers import UniPCMultistepScheduler

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 5)).astype(np.float32)
    c = rng.standard_normal((2, 5)).astype(np.float32)
    for n in (1, 4, 12):
        sch = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0,
                                      solver_order=2)
        sch.set_timesteps(n)
        grid = sch.sigmas.numpy().astype(np.float32)
        x, ct = torch.tensor(x0, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
        for i, t in enumerate(sch.timesteps):
            sg = float(grid[i])
            x = sch.step(0.4 * x + (1 + sg) * ct - 0.3 * x ** 2 * sg, t, x).prev_sample
        g = jnp.asarray(grid)
        ours = integrate(lambda xx, i: 0.4 * xx + (1 + g[i]) * c - 0.3 * xx ** 2 * g[i], jnp.asarray(x0), grid,
                         "unipc")
        np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)
    # Wan's grid: shift(linspace(1 - 1/1000, 0, N + 1)[:-1]) ++ [0]
    g = unipc_sigmas(4, 5.0)
    s = np.linspace(0.999, 0, 5)[:-1]
    np.testing.assert_allclose(g, np.append(5 * s / (1 + 4 * s), 0.0), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ chaining


def _pixels_of_y(s, y):
    """The patch codec is invertible: the pixels the conditioning latents encode."""
    return np.asarray(s.codec.decode(s.codec.params, y[..., 4:]))[0]


@pytest.fixture(scope="module")
def film(env):
    return S.LongVideoSampler(env["config"], num_steps=2, cfg_scale=1.0, motion_frames=5, pad="zero")


def test_shot_vs_film_conditioning(env, film):
    shot = env["shot"]
    ref, ref_f = env["ref"], S.to_float(env["ref"])
    prev = np.random.default_rng(3).integers(0, 256, (T, H, W, 3), dtype=np.uint8)    # a "previous clip"
    mask = i2v_mask(T, 4, 4)
    for s, m in ((shot, 1), (film, 5)):
        assert s.m == m
        st0 = s.initial_state(ref)
        st1 = s.next_state(st0, prev, None)
        np.testing.assert_array_equal(st1.cond_frames, prev[T - m:])       # the last m frames are carried
        for st, cond in ((st0, ref[None]), (st1, prev[T - m:])):
            y, clip = s.conditioning(st, ref)
            assert y.shape == (1, 3, 4, 4, 4 + 48)
            np.testing.assert_array_equal(np.asarray(y[0, ..., :4]), mask)  # only pixel frame 0 marked
            px = _pixels_of_y(s, y)
            k = len(cond)
            np.testing.assert_allclose(px[:k], S.to_float(cond), atol=1e-6)
            pad = np.broadcast_to(ref_f, px[k:].shape) if s is shot else np.zeros_like(px[k:])
            np.testing.assert_allclose(px[k:], pad, atol=1e-6)              # Shot: reference; Film: zeros
            np.testing.assert_allclose(clip, s._clip(s.clip_params, jnp.asarray(S.to_float(cond[:1]))),
                                       rtol=1e-5, atol=1e-5)                 # CLIP sees the first condition frame
    # latent chaining: clip k+1's conditioning starts with clip k's last latent frame, the rest as clip 0's
    lat = copy.copy(shot)                       # the same models and compiled functions, chaining on latents
    lat.chain, lat._base_latents = "latent", None
    y0, _ = lat.conditioning(lat.initial_state(ref), ref)
    z = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 48))
    st1 = lat.next_state(lat.initial_state(ref), prev, z)
    assert st1.cond_latents.shape == (1, 4, 4, 48)
    y1, _ = lat.conditioning(st1, ref)
    np.testing.assert_array_equal(np.asarray(y1[0, 0, ..., 4:]), np.asarray(z[0, -1]))
    np.testing.assert_array_equal(np.asarray(y1[0, 1:]), np.asarray(y0[0, 1:]))
    assert S.motion_latent_frames(1) == 1 and S.motion_latent_frames(5) == 2 and S.motion_latent_frames(9) == 3


# ------------------------------------------------------------------------------------------------ long videos


@pytest.fixture(scope="module")
def shot_run(env, tmp_path_factory):
    """An uninterrupted 3-clip Shot generation, as the CLI would do it (same settings as the resume test)."""
    out = str(tmp_path_factory.mktemp("uninterrupted") / "out.mp4")
    schedule = S.schedule_prompts(env["prompts"], 3, cycle=True)
    inputs = {"image_sha256": S.file_sha256(str(env["dir"] / "ref.png")), "lora": None, "lora_scale": 1.0}
    summary = S.generate(env["shot"], env["ref"], schedule, out, inputs=inputs, lossless=True, progress=False)
    return out, summary


def test_in_memory_rollout_equals_the_generated_video(env, shot_run):
    """``LongVideoSampler.rollout`` (what the drift experiment runs) makes the same frames as ``generate``."""
    out, _ = shot_run
    schedule = S.schedule_prompts(env["prompts"], 3, cycle=True)
    np.testing.assert_array_equal(env["shot"].rollout(env["ref"], schedule, seed=0), S.Output(out).read_lossless())


def test_clips_from_a_chain_state_continue_the_uninterrupted_clips(env, shot_run):
    """The one per-clip loop (``clips``, under ``rollout`` and ``generate``): started from the state after clip 1 it
    gives the uninterrupted run's clips 2 and 3 (what ``--resume`` relies on); segment + tail are the clip's
    frames."""
    s, ref = env["shot"], env["ref"]
    schedule = S.schedule_prompts(env["prompts"], 3, cycle=True)
    full = list(s.clips(ref, schedule, seed=0))
    assert [r.clip for r in full] == [0, 1, 2] and [r.seed for r in full] == [0, 42, 84]
    later = list(s.clips(ref, schedule, seed=0, state=full[0].state))
    assert [r.clip for r in later] == [1, 2]
    for a, b in zip(full[1:], later):
        np.testing.assert_array_equal(a.frames, b.frames)
    for r in full:
        np.testing.assert_array_equal(np.concatenate([r.segment, r.tail]), r.frames)
        np.testing.assert_array_equal(r.state.cond_frames, r.tail)
    np.testing.assert_array_equal(np.concatenate([r.segment for r in full] + [full[-1].tail]),
                                  S.Output(shot_run[0]).read_lossless())


def _clips_one_by_one(s, ref, schedule):
    """Each clip of a chain sampled here one at a time (seeds as generate: clip_seed(0, k))."""
    state, clips = s.initial_state(ref), []
    for k, prompt in enumerate(schedule):
        y, clip = s.conditioning(state, ref)
        frames = s.decode(s.sample(prompt, y, clip, S.clip_seed(0, k)))
        assert frames.shape == (T, H, W, 3)
        clips.append(frames)
        state = s.next_state(state, frames, None)
    return clips


def test_stitched_video_is_the_clips_concatenated(env, shot_run, film, tmp_path):
    """The stitched video is every clip without its last m frames, then the final clip whole (m = 1 for Shot, 5 for
    Film), with each clip sampled here one by one (not only the frame count: dropping the next clip's first m frames
    instead gives the same count)."""
    ref = env["ref"]
    schedule = S.schedule_prompts(env["prompts"], 3, cycle=True)
    clips = _clips_one_by_one(env["shot"], ref, schedule)
    assert all(not np.array_equal(a[-1], b[0]) for a, b in zip(clips, clips[1:]))  # the boundaries are visible
    want = np.concatenate([c[:T - 1] for c in clips[:-1]] + [clips[-1]])
    np.testing.assert_array_equal(S.Output(shot_run[0]).read_lossless(), want)
    # Film: m = 5 frames overlap; the first 5 of clip 2 differ from the last 5 of clip 1
    a, b = _clips_one_by_one(film, ref, schedule[:2])
    assert not np.array_equal(a[T - 5:], b[:5])
    out = str(tmp_path / "film.mp4")
    S.generate(film, ref, schedule[:2], out, lossless=True, progress=False)
    np.testing.assert_array_equal(S.Output(out).read_lossless(), np.concatenate([a[:T - 5], b]))


def test_frame_count_and_outputs(env, shot_run, film, tmp_path):
    out, summary = shot_run
    n = 3 * (T - 1) + 1                                           # every clip but the last gives up 1 frame
    assert summary["total_frames"] == n and summary["new_frames_per_clip"] == T - 1
    assert video_io.count_frames(out) == n
    frames = S.Output(out).read_lossless()
    assert frames.shape == (n, H, W, 3)
    gray = lambda v: v.astype(np.float64).mean(-1).ravel()                    # noqa: E731 (4:2:0 keeps luma)
    assert np.corrcoef(gray(video_io.read_mp4(out)), gray(frames))[0, 1] > 0.7    # the mp4 holds these frames
    side = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert [c["seed"] for c in side["clips"]] == [0, 42, 84]
    assert [c["prompt"] for c in side["clips"]] == env["prompts"] + env["prompts"][:1]
    assert side["clips"][2]["frames"] == [2 * (T - 1), 3 * (T - 1) + 1]
    assert all(c["timings"]["s_per_step"] > 0 for c in side["clips"])
    assert side["attention"] == "per_head"                   # what attention='auto' ran as on this CPU
    # Film: 5 motion frames are dropped from every clip but the last
    s2 = S.generate(film, env["ref"], ["a", "b"], str(tmp_path / "film.mp4"), progress=False, save_clips=True)
    assert s2["total_frames"] == 2 * (T - 5) + 5 == video_io.count_frames(str(tmp_path / "film.mp4"))
    assert video_io.count_frames(str(tmp_path / "film_clips" / "clip_0002.mp4")) == T
    with pytest.raises(S.ResumeError, match="--resume"):           # an existing generation is not clobbered
        S.generate(film, env["ref"], ["a"], str(tmp_path / "film.mp4"), progress=False)
    with pytest.raises(S.ResumeError, match="different settings: .*motion_frames"):
        S.generate(env["shot"], env["ref"], ["a", "b", "c"], str(tmp_path / "film.mp4"), progress=False,
                   resume=True)
    s3 = S.generate(film, env["ref"], ["a", "b", "c"], str(tmp_path / "film.mp4"), progress=False, resume=True)
    assert s3["total_frames"] == 3 * (T - 5) + 5 == video_io.count_frames(str(tmp_path / "film.mp4"))  # extended


def _cli(env, out, extra_env=None, resume=False, args=(), pause=None):
    run = [PAUSE, pause, out + ".paused"] if pause else ["-m", "svi_jax.sample"]
    cmd = [sys.executable, *run, f"--config={env['cfg_path']}", f"--image={env['dir'] / 'ref.png'}",
           f"--prompts={env['dir'] / 'prompts.txt'}", f"--out={out}", f"--num_steps={STEPS}", "--num_clips=3",
           "--cycle_prompts", "--lossless", "--noprogress", *args] + (["--resume"] if resume else [])
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(env["dir"] / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_mid_clip_2(env, out, args=()):
    """Run the CLI until clip 2 of 3 sleeps at its second step (tests/sample_pause.py), then SIGKILL it."""
    proc = _cli(env, out, args=args, pause="1:1")
    try:
        deadline = time.time() + 600
        while not os.path.exists(out + ".paused"):
            if proc.poll() is not None:
                raise AssertionError(f"sampler exited early: {proc.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, "the sampler never reached clip 2"
            time.sleep(0.2)
        assert video_io.count_frames(out) == T                     # clip 1 is out and playable mid-clip 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.load(open(out + ".parts/state.json"))["next_clip"] == 1


def test_kill_mid_clip_then_resume_is_identical(env, shot_run, tmp_path):
    ref_out, _ = shot_run
    out = str(tmp_path / "out.mp4")
    _kill_mid_clip_2(env, out)
    proc = _cli(env, out, resume=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert json.loads(stdout.decode().strip().splitlines()[-1])["frames"] == 3 * (T - 1) + 1
    np.testing.assert_array_equal(S.Output(out).read_lossless(), S.Output(ref_out).read_lossless())
    np.testing.assert_array_equal(video_io.read_mp4(out), video_io.read_mp4(ref_out))
    assert open(out, "rb").read() == open(ref_out, "rb").read()    # deterministic encoding: same bytes
    side = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert [c["seed"] for c in side["clips"]] == [0, 42, 84]



def test_latent_chain_kill_mid_clip_then_resume_is_identical(env, shot_run, tmp_path):
    """``--chain latent`` carries clip k's last latent frame into clip k+1 (not a re-encoding of its pixels): a
    resumed run must restore those latents from ``OUT.mp4.parts/`` and give the uninterrupted run's frames."""
    schedule = S.schedule_prompts(env["prompts"], 3, cycle=True)
    inputs = {"image_sha256": S.file_sha256(str(env["dir"] / "ref.png")), "lora": None, "lora_scale": 1.0}
    latent = S.LongVideoSampler(env["config"], num_steps=STEPS, cfg_scale=5.0, chain="latent")
    ref_out = str(tmp_path / "uninterrupted.mp4")
    S.generate(latent, env["ref"], schedule, ref_out, inputs=inputs, lossless=True, progress=False)
    want = S.Output(ref_out).read_lossless()
    pixel = S.Output(shot_run[0]).read_lossless()
    np.testing.assert_array_equal(want[:T - 1], pixel[:T - 1])     # clip 1 has nothing carried yet
    assert np.abs(want[T:].astype(int) - pixel[T:]).max() > 8      # later clips: the latent chain is another video
    out = str(tmp_path / "out.mp4")
    _kill_mid_clip_2(env, out, args=("--chain=latent",))
    with np.load(S.Output(out).carry(1)) as z:
        assert z["cond_latents"].shape[0] == 1                     # what clip 2 is conditioned on is on disk
    proc = _cli(env, out, resume=True, args=("--chain=latent",))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert json.loads(stdout.decode().strip().splitlines()[-1])["frames"] == 3 * (T - 1) + 1
    np.testing.assert_array_equal(S.Output(out).read_lossless(), want)
    assert open(out, "rb").read() == open(ref_out, "rb").read()    # deterministic encoding: same bytes

def test_cli_bad_inputs_fail_with_one_error_line(env, tmp_path):
    """Missing image, missing LoRA, a non-.mp4 --out, a text encoder narrower than the DiT's text_dim, a T2V model
    (the long-video sampler chains clips through image conditioning: I2V only): exit code 2, one ``error:`` line
    naming the problem, and nothing written (no ``OUT.parts/``: the check comes before the first clip)."""
    def cmd(image, out, *extra):
        return [sys.executable, "-m", "svi_jax.sample", f"--config={env['cfg_path']}", f"--image={image}",
                "--prompt=a boat", f"--out={out}", "--num_steps=1", "--noprogress", *extra]

    ref = str(env["dir"] / "ref.png")
    t2v = ("--config.model.model_type=t2v", "--config.model.in_dim=48", "--config.checkpoints.dit=")  # random T2V
    cases = {"missing image": (cmd(str(tmp_path / "nope.png"), str(tmp_path / "a.mp4")), ["nope.png"]),
             "missing LoRA": (cmd(ref, str(tmp_path / "b.mp4"), f"--lora={tmp_path / 'no_lora.safetensors'}"),
                              ["no_lora.safetensors"]),
             "non-mp4 out": (cmd(ref, str(tmp_path / "c.avi")), ["c.avi"]),
             "encoder width": (cmd(ref, str(tmp_path / "d.mp4"), "--config.encoders.t5.dim=24"),
                               ["width 24", "text_dim 32"]),
             "T2V model": (cmd(ref, str(tmp_path / "e.mp4"), *t2v), ["I2V", "'t2v'"])}
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, (c, _) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        err = err.decode()
        assert p.returncode == 2, (name, err[-2000:])
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and all(w in lines[-1] for w in cases[name][1]), (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        out = next(a for a in cases[name][0] if a.startswith("--out="))[len("--out="):]
        assert not os.path.exists(out + ".parts") and not os.path.exists(out), (name, os.listdir(tmp_path))
