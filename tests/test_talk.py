"""SVI-Talk: audio windows vs a NumPy transcription of the official ``cut_audio_embedding``, clip chaining, the
3-pass guidance, and the sampling CLI (kill + --resume, audio muxed into the mp4)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

from svi_jax import talk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE = os.path.join(ROOT, "tests", "sample_pause.py")    # the CLI pausing at CLIP:STEP (the test-only hook)


def official_cut_audio_embedding(audio_embed, num_frames, audio_start_idx=0):
    """utils/audio_process.py L78-106 (vita-epfl/Stable-Video-Infinity @34e4c50) with torch ops written in NumPy;
    ``audio_embed`` is the stored ``[12, T, 768]`` embedding."""
    audio_embed = rearrange(audio_embed, "b s d -> s b d")
    indices = (np.arange(2 * 2 + 1) - 2) * 1
    clip_length = num_frames
    audio_end_idx = audio_start_idx + clip_length
    center_indices = np.arange(audio_start_idx, audio_end_idx, 1)[:, None] + indices[None, :]
    center_indices = np.clip(center_indices, 0, audio_embed.shape[0] - 1)
    audio_embed = audio_embed[center_indices][None, ...]
    audio_window = 5
    vae_scale = 4
    first_frame_audio_emb_s = audio_embed[:, :1, ...]
    latter_frame_audio_emb = audio_embed[:, 1:, ...]
    latter_frame_audio_emb = rearrange(latter_frame_audio_emb, "b (n_t n) w s c -> b n_t n w s c", n=vae_scale)
    middle_index = audio_window // 2
    latter_first = latter_frame_audio_emb[:, :, :1, :middle_index + 1, ...]
    latter_first = rearrange(latter_first, "b n_t n w s c -> b n_t (n w) s c")
    latter_last = latter_frame_audio_emb[:, :, -1:, middle_index:, ...]
    latter_last = rearrange(latter_last, "b n_t n w s c -> b n_t (n w) s c")
    latter_middle = latter_frame_audio_emb[:, :, 1:-1, middle_index:middle_index + 1, ...]
    latter_middle = rearrange(latter_middle, "b n_t n w s c -> b n_t (n w) s c")
    latter_frame_audio_emb_s = np.concatenate([latter_first, latter_middle, latter_last], axis=2)
    return first_frame_audio_emb_s[0], latter_frame_audio_emb_s[0]


@pytest.mark.parametrize("steps,start,frames", [(203, 0, 81), (203, 80, 81), (203, 161, 81), (37, 0, 81),
                                                (97, 33, 17), (7, 5, 9)])
def test_windows_match_official(steps, start, frames):
    emb = np.random.RandomState(steps + start).randn(3, steps, 2).astype(np.float32)   # [layers, T, C] as stored
    ref_first, ref_later = official_cut_audio_embedding(emb, frames, start)
    first, later = talk.audio_windows(np.transpose(emb, (1, 0, 2)), start, frames)
    assert first.shape == (1, 5, 3, 2) and later.shape == ((frames - 1) // 4, 8, 3, 2)
    np.testing.assert_array_equal(first, ref_first)
    np.testing.assert_array_equal(later, ref_later)
    # jnp input takes the same path
    jf, jl = talk.audio_windows(jnp.asarray(np.transpose(emb, (1, 0, 2))), start, frames)
    np.testing.assert_array_equal(np.asarray(jl), ref_later)


def test_clip_audio_slices():
    assert [talk.clip_audio_start(k) for k in range(4)] == [0, 80, 161, 242]
    assert talk.clip_audio_start(2, 17, 1) == 33
    # clip k's frame i sees audio step 81k - 1 + i (k >= 1): the first window centre, and 3+1+1+3 per group
    emb = np.arange(300, dtype=np.float32)[:, None, None]
    first, later = talk.audio_windows(emb, talk.clip_audio_start(2), 81)
    assert first[0, :, 0, 0].tolist() == [159, 160, 161, 162, 163]
    assert later[0, :, 0, 0].tolist() == [160, 161, 162, 163, 164, 165, 166, 167]   # frames 1..4 -> steps 162..165
    assert later[-1, :, 0, 0].tolist() == [236, 237, 238, 239, 240, 241, 242, 243]   # frames 77..80
    assert talk.clips_for_audio(1, 81) == 1 and talk.clips_for_audio(81, 81) == 1 and talk.clips_for_audio(82) == 2


def test_three_pass_guidance_matches_official_formula():
    """make_talk_sampler's velocity = uncond + 2 (cond - drop_text) + 5 (drop_text - uncond), one Euler step."""
    from configs import talk_tiny
    from svi_jax.models.dit import DiTConfig, WanDiT, init_params
    from svi_jax.models.audio import audio_input_shapes
    from svi_jax.denoise import euler_sigmas

    cfg = DiTConfig.from_dict(talk_tiny.get_config().model.to_dict())
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(1, 3, 2, 2, cfg.out_dim), jnp.float32)
    y = jnp.asarray(r.randn(1, 3, 2, 2, cfg.in_dim - cfg.out_dim), jnp.float32)
    ctx, neg = (jnp.asarray(r.randn(1, 5, cfg.text_dim), jnp.float32) for _ in range(2))
    clip = jnp.asarray(r.randn(1, 257, cfg.image_dim), jnp.float32)
    audio = tuple(jnp.asarray(r.randn(*s), jnp.float32) for s in audio_input_shapes(cfg, 3))
    null = tuple(jnp.zeros_like(a) for a in audio)
    out = talk.make_talk_sampler(cfg, 1, 5.0, 2.0, 5.0)(params, x, ctx, neg, clip, y, audio, null)
    m = WanDiT(cfg)
    t = jnp.full((1,), 1000.0, jnp.float32)
    f = jax.jit(lambda c, a: m.apply({"params": params}, x, t, c, clip_fea=clip, y=y, audio=a))
    vc, vu, vd = f(ctx, audio), f(neg, null), f(neg, audio)
    v = vu + 2.0 * (vc - vd) + 5.0 * (vd - vu)
    s = euler_sigmas(1, 5.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x + v * (s[1] - s[0])), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(vu - vd))) > 1e-4      # zero audio windows still change the output


# ------------------------------------------------------------------------------------------------ CLI


def _write_wav(path, seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    pcm = (np.sin(2 * np.pi * 180 * t) * (0.4 + 0.3 * np.sin(2 * np.pi * 2 * t)) * 20000).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


def _image(path):
    from PIL import Image

    r = np.random.RandomState(0)
    Image.fromarray((r.rand(32, 48, 3) * 255).astype(np.uint8)).save(path)


def _cmd(tmp_path, out, *extra, pause=None):
    run = [PAUSE, pause, f"{out}.paused"] if pause else ["-m", "svi_jax.sample"]
    return [sys.executable, *run, f"--config={ROOT}/configs/talk_tiny.py",
            f"--image={tmp_path / 'face.png'}", f"--audio={tmp_path / 'speech.wav'}", "--prompt=a person is talking",
            f"--out={out}", "--num_steps=3", "--lossless", "--noprogress", *extra]


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **kw)
    env.update(kw)
    return env


@pytest.fixture(scope="module")
def talk_run(tmp_path_factory):
    """One uninterrupted tiny talking generation: 1.0 s of audio = 25 steps -> 2 clips of 17 frames."""
    tmp = tmp_path_factory.mktemp("talk")
    _write_wav(tmp / "speech.wav", 1.0)
    _image(tmp / "face.png")
    out = tmp / "full.mp4"
    r = subprocess.run(_cmd(tmp, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out


def test_talk_cli_output_has_audio(talk_run):
    from svi_jax.sample import Output

    tmp, out = talk_run
    side = json.load(open(str(out).replace(".mp4", ".json")))
    assert side["num_clips"] == 2 and side["total_frames"] == 34 and side["fps"] == 25
    assert [c["audio_steps"] for c in side["clips"]] == [[0, 17], [16, 33]]
    frames = Output(str(out)).read_lossless()
    assert frames.shape == (34, 32, 48, 3)
    info = talk.probe_streams(str(out))
    assert info["video"] and info["audio"]
    assert abs(info["audio_duration"] - 1.0) < 0.1, info       # the audio's length (video 1.36 s, -shortest)


def test_talk_cli_kill_and_resume_identical(talk_run):
    from svi_jax.sample import Output

    tmp, full = talk_run
    out = tmp / "resumed.mp4"
    proc = subprocess.Popen(_cmd(tmp, out, pause="1:1"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    paused = str(out) + ".paused"
    t0 = time.time()
    while not os.path.exists(paused):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() - t0 < 500
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = json.load(open(os.path.join(str(out) + ".parts", "state.json")))
    assert st["next_clip"] == 1 and st["clips"][0]["audio_steps"] == [0, 17]
    r = subprocess.run(_cmd(tmp, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(Output(str(out)).read_lossless(), Output(str(full)).read_lossless())
    assert talk.probe_streams(str(out))["audio"]
    # a different audio file is a different generation
    _write_wav(tmp / "speech.wav", 1.0, sr=8000)
    r = subprocess.run(_cmd(tmp, out, "--resume", "--num_clips=3"), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "audio" in r.stderr, r.stderr[-2000:]
    _write_wav(tmp / "speech.wav", 1.0)


def test_talk_cli_needs_audio(tmp_path):
    _image(tmp_path / "face.png")
    cmd = [c for c in _cmd(tmp_path, tmp_path / "x.mp4") if not c.startswith("--audio")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs --audio" in r.stderr, r.stderr[-2000:]
