"""SVI-Talk: audio-driven long talking videos (official ``test_svi_talk.py``, ``svi_video_talk.py``,
``utils/audio_process.py``).

* :func:`frame_windows` / :func:`split_windows` / :func:`audio_windows`: the official ``cut_audio_embedding``
  (= ``get_audio_embedding`` + ``preprocess_audio``): video frame ``i`` of a clip starting at audio step ``s`` gets
  steps ``s+i-2 .. s+i+2`` clamped to the audio; frame 0 keeps all 5, frames ``1..T-1`` are grouped 4 per latent
  frame keeping 3 + 1 + 1 + 3 = 8 entries (the first frame's steps ``<= centre``, the middle frames' centre, the last
  frame's ``>= centre``).
* :func:`clip_audio_start`: clip ``k >= 1`` starts at audio step ``k * T - m`` (81k - 1 with one motion frame);
  every clip keeps all its ``T`` frames in the stitched video (25 fps), so the audio leads the video by ``m`` steps
  from clip 1 on, constantly.
* :func:`make_talk_sampler`: the 3-pass guidance ``uncond + s_t (cond - drop_text) + s_a (drop_text - uncond)``
  (text 2, audio 5): cond = prompt + audio, drop_text = negative prompt + audio, uncond = negative prompt + all-zero
  audio windows (which still go through ``audio_proj``); every pass sees the image conditioning.
* :class:`TalkSampler`: :class:`svi_jax.long_video.LongVideoSampler` with the audio of each clip.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax import flow
from svi_jax.encoders import make_audio_encoder  # noqa: F401 (API: svi_jax.talk.make_audio_encoder)
from svi_jax.data.audio import AUDIO_WINDOW, FPS, VAE_SCALE, audio_windows, frame_windows, split_windows  # noqa: F401
from svi_jax.long_video import ChainState, LongVideoSampler
from svi_jax.denoise import _batch, _pad_len, euler_sigmas, integrate, unipc_sigmas

log = logging.getLogger("svi_jax.talk")


# ------------------------------------------------------------------------------------------------ chaining


def clip_audio_start(k: int, num_frames: int = 81, motion_frames: int = 1) -> int:
    """Audio step of clip ``k``'s first frame: 0, then ``k * num_frames - motion_frames``."""
    return 0 if k == 0 else k * num_frames - motion_frames


def clips_for_audio(num_steps: int, num_frames: int = 81) -> int:
    """Clips needed to cover ``num_steps`` audio steps at one audio step per video frame, all frames kept."""
    return max(1, math.ceil(num_steps / num_frames))


# ------------------------------------------------------------------------------------------------ sampler


def make_talk_sampler(dit_config, num_steps: int = 50, shift: float = 5.0, cfg_text: float = 2.0,
                      cfg_audio: float = 5.0, solver: str = "euler",
                      on_step: Optional[Callable[[int], None]] = None, jit: bool = True):
    """Jitted ``sample(params, noise, context, neg_context, clip_fea, y, audio, null_audio) -> latents`` with the
    official 3-pass audio/text guidance (``_sample_with_multitalk``, svi_video_talk.py L448-466)."""
    from svi_jax.models.dit import WanDiT

    module = WanDiT(dit_config)
    grid = euler_sigmas(num_steps, shift) if solver == "euler" else unipc_sigmas(num_steps, shift)
    tgrid = (grid.astype(np.float64) * flow.NUM_TRAIN_TIMESTEPS).astype(np.float32)
    guided = cfg_text != 1.0 or cfg_audio != 1.0

    def forward(params, x, t, ctx, clip, y, audio):
        tt = jnp.full((x.shape[0],), t, jnp.float32)
        return module.apply({"params": params}, x, tt, ctx, clip_fea=clip, y=y, audio=audio)

    def sample(params, noise, context, neg_context, clip_fea, y, audio, null_audio):
        b = noise.shape[0]
        ctx, clip, yy = _batch(context, b), _batch(clip_fea, b), _batch(y, b)
        aud = tuple(_batch(a, b) for a in audio)
        null = tuple(_batch(a, b) for a in null_audio)
        neg = _batch(neg_context, b)
        length = max(ctx.shape[1], neg.shape[1])
        ctx, neg = _pad_len(ctx, length), _pad_len(neg.astype(ctx.dtype), length)

        def velocity(x, i):
            t = jnp.asarray(tgrid)[i]
            v_cond = forward(params, x, t, ctx, clip, yy, aud)
            if not guided:
                return v_cond
            v_uncond = forward(params, x, t, neg, clip, yy, null)
            v_drop_text = forward(params, x, t, neg, clip, yy, aud)
            return v_uncond + cfg_text * (v_cond - v_drop_text) + cfg_audio * (v_drop_text - v_uncond)

        return integrate(velocity, noise.astype(jnp.float32), grid, solver, on_step)

    return jax.jit(sample) if jit else sample


def audio_features(config, audio_path: str) -> np.ndarray:
    """The audio file's ``[T25, layers, hidden]`` wav2vec2 features (official ``audio_prepare_single`` +
    ``get_embedding``)."""
    from svi_jax.models.wav2vec2 import read_audio

    enc = make_audio_encoder(config)
    m = config.model
    if (enc.config.hidden_size, enc.config.num_hidden_layers) != (m.audio_in_dim, m.audio_layers):
        raise ValueError(f"wav2vec2 gives {enc.config.num_hidden_layers} layers x {enc.config.hidden_size}, the DiT's "
                         f"audio_proj expects config.model.audio_layers x audio_in_dim = {m.audio_layers} x "
                         f"{m.audio_in_dim}")
    return enc.features(read_audio(audio_path))


class TalkSampler(LongVideoSampler):
    """SVI-Talk clips: Shot's conditioning (last frame + reference x (T-1), CLIP of the motion frame), the clip's
    audio windows, 3-pass guidance, and every clip's ``T`` frames kept in the stitched video."""

    def __init__(self, config, features: np.ndarray, *, cfg_scale_audio: float = 5.0, cfg_scale: float = 2.0,
                 on_step=None, **kw):
        if not config.model.get("multitalk", False):
            raise ValueError("SVI-Talk needs a DiT with the MultiTalk audio layers (config.model.multitalk = True)")
        kw.setdefault("pad", "ref")
        super().__init__(config, cfg_scale=cfg_scale, on_step=on_step, **kw)
        if self.chain != "pixel":
            raise ValueError("SVI-Talk chains in pixel space (--chain pixel)")
        feats = np.asarray(features, np.float32)
        if feats.ndim != 3 or feats.shape[1:] != (config.model.audio_layers, config.model.audio_in_dim):
            raise ValueError(f"audio features {feats.shape} are not [T, {config.model.audio_layers}, "
                             f"{config.model.audio_in_dim}]")
        self.features = feats
        self.cfg_scale_audio = float(cfg_scale_audio)
        self.sample_fn = make_talk_sampler(self.dit_config, self.num_steps, self.shift, self.cfg_scale,
                                           self.cfg_scale_audio, self.solver, on_step=on_step)

    @property
    def num_audio_steps(self) -> int:
        return int(self.features.shape[0])

    def audio_start(self, k: int) -> int:
        return clip_audio_start(k, self.T, self.m)

    def clip_audio(self, k: int):
        """``(first [1, 1, 5, L, C], later [1, F-1, 8, L, C])`` of clip ``k``."""
        first, later = audio_windows(self.features, self.audio_start(k), self.T, AUDIO_WINDOW, VAE_SCALE)
        return jnp.asarray(first)[None], jnp.asarray(later)[None]

    def conditioning(self, state: ChainState, reference_u8: np.ndarray):
        y, clip_fea = super().conditioning(state, reference_u8)
        return y, (clip_fea, self.clip_audio(state.clip))

    def _sample_args(self, prompt: str, y, cond, seed: int, clip: int = 0):   # clip: for condition streams
        clip_fea, audio = cond
        null = tuple(jnp.zeros_like(a) for a in audio)
        return (self.params, self.noise(y, seed), self.encode_text(prompt), self.encode_text(self.negative_prompt),
                clip_fea, y, audio, null)

    def segment_frames(self, state: ChainState, frames: np.ndarray) -> np.ndarray:
        """All frames are kept (official ``video_list += video``): the previous clip's held-back last frames lead
        this clip's segment."""
        new = frames[: self.T - self.m]
        return np.concatenate([state.cond_frames, new]) if state.clip > 0 else new

    def clip_record(self, k: int) -> dict:
        s = self.audio_start(k)
        return {"audio_steps": [s, s + self.T]}

    @property
    def new_frames_per_clip(self) -> int:
        return self.T

    def total_frames(self, num_clips: int) -> int:
        return num_clips * self.T

    def settings(self) -> dict:
        enc = self.config.encoders.get("wav2vec2")
        return dict(super().settings(), cfg_scale_audio=self.cfg_scale_audio, audio_steps=self.num_audio_steps,
                    wav2vec2=self.config.checkpoints.get("wav2vec2", ""),
                    wav2vec2_encoder=enc.to_dict() if enc is not None else {})


# ------------------------------------------------------------------------------------------------ muxing


def mux_audio(video: str, audio: str) -> None:
    """Replace ``video`` (mp4) by itself with ``audio``'s track (AAC), cut to the shorter of the two, atomically
    (ffmpeg from imageio-ffmpeg; the video stream is copied)."""
    import imageio_ffmpeg

    tmp = video + ".mux.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-i", video, "-i", audio,
           "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", tmp]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(f"cannot mux {audio} into {video}: {r.stderr.decode(errors='replace').strip()[-300:]}")
    os.replace(tmp, video)


def probe_streams(path: str) -> dict:
    """``{'duration': s, 'video': bool, 'audio': bool, 'audio_duration': s | None}`` of a media file (ffmpeg)."""
    import re

    import imageio_ffmpeg

    ff = imageio_ffmpeg.get_ffmpeg_exe()
    r = subprocess.run([ff, "-hide_banner", "-nostdin", "-i", path], capture_output=True)
    err = r.stderr.decode(errors="replace")
    m = re.search(r"Duration: (\d+):(\d+):([\d.]+)", err)
    dur = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else None
    out = {"duration": dur, "video": "Video:" in err, "audio": "Audio:" in err, "audio_duration": None}
    if out["audio"]:
        r = subprocess.run([ff, "-nostdin", "-i", path, "-map", "0:a:0", "-f", "null", "-"], capture_output=True)
        times = re.findall(r"time=(\d+):(\d+):([\d.]+)", r.stderr.decode(errors="replace"))
        if times:
            h, mi, s = times[-1]
            out["audio_duration"] = int(h) * 3600 + int(mi) * 60 + float(s)
    return out


# ------------------------------------------------------------------------------------------------ CLI glue


class TalkRun:
    """What ``python -m svi_jax.sample`` does differently for a MultiTalk config: the audio features, the number of
    clips (from the audio length unless ``--num_clips``), the official defaults (text CFG 2, audio CFG 5, 25 fps,
    one motion frame, reference padding), and the audio muxed into the output after every clip."""

    def __init__(self, flags, config, prompts):
        from svi_jax.prompts import schedule_prompts
        from svi_jax.sample_output import file_sha256

        if not flags.audio:
            raise ValueError("a MultiTalk config (config.model.multitalk) needs --audio FILE")
        self.flags, self.config, self.audio = flags, config, flags.audio
        self.features = audio_features(config, flags.audio)
        T = int(config.data.num_frames)
        self.num_clips = int(flags.num_clips) or clips_for_audio(self.features.shape[0], T)
        self.schedule = schedule_prompts(prompts, self.num_clips, flags.repeat_prompt,
                                         flags.keep_first_prompt or len(prompts) == 1, True, flags.prompt_prefix)
        talk = config.get("talk", {})
        self.fps = float(flags.fps) if flags["fps"].present else float(talk.get("fps", FPS))
        self.cfg_text = float(flags.cfg_scale) if flags["cfg_scale"].present else float(talk.get("cfg_text", 2.0))
        self.cfg_audio = float(flags.cfg_scale_audio)
        self.inputs = {"audio_sha256": file_sha256(flags.audio)}
        log.info("audio %s: %d steps at 25 fps -> %d clips of %d frames", flags.audio, self.features.shape[0],
                 self.num_clips, T)

    def sampler(self, bar, **kw) -> TalkSampler:
        f = self.flags
        shift = kw.pop("shift", None)
        shift = shift if shift is not None else (f.shift if f.shift is not None else float(self.config.erft.shift))
        return TalkSampler(self.config, self.features, cfg_scale_audio=self.cfg_audio, cfg_scale=self.cfg_text,
                           on_step=bar, lora=f.lora, lora_scale=f.lora_scale, num_steps=f.num_steps, shift=shift,
                           solver=f.solver, motion_frames=f.motion_frames, pad=f.pad,
                           negative_prompt=f.negative_prompt, **kw)

    def on_clip(self, k: int) -> None:
        mux_audio(os.path.abspath(self.flags.out), self.audio)

    def finish(self) -> None:
        """Mux once more (a resumed run with nothing left to generate republishes the video without audio)."""
        if not probe_streams(self.flags.out)["audio"]:
            mux_audio(os.path.abspath(self.flags.out), self.audio)
