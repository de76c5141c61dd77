"""The chain between the clips of a long video and the one per-clip loop, free of any model: pixel conversions,
the conditioning video, :class:`ChainState` (what a clip is conditioned on), :class:`ClipResult` (a finished clip)
and :class:`ClipLoop` (conditioning -> sample -> decode -> next state, one :class:`ClipResult` per clip).

The samplers build on it: :class:`svi_jax.long_video.LongVideoSampler` (Shot/Film, Dance; SVI-Talk's
:class:`svi_jax.talk.TalkSampler` subclasses it) and :class:`svi_jax.pro.ProSampler` (SVI 2.0 Pro). It imports
nothing of theirs, so the model code they load can import it back.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from svi_jax.prompts import clip_seed


# ------------------------------------------------------------------------------------------------ images


def to_float(frames_u8) -> np.ndarray:
    """uint8 pixels -> [-1, 1] as DiffSynth's ``preprocess_image`` (``x * 2 / 255 - 1``)."""
    return np.asarray(frames_u8, np.float32) * (2.0 / 255.0) - 1.0


def to_uint8(frames) -> np.ndarray:
    """[-1, 1] -> uint8 as DiffSynth's ``tensor2video`` (``((x + 1) * 127.5).clip(0, 255)`` truncated)."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An RGB image resized to ``width x height`` (PIL bicubic, as the official ``Image.resize``): uint8 [H, W, 3].
    Any mode (16-bit, palette, CMYK, LA, ...) is converted correctly; see :mod:`svi_jax.images`."""
    from svi_jax import images

    return images.load_image(path, height, width)


def condition_video(reference_u8: np.ndarray, cond_u8: np.ndarray, num_frames: int, pad: str) -> np.ndarray:
    """The VAE input of the conditioning, float [-1, 1] ``[num_frames, H, W, 3]``: the condition frames, then
    ``pad='ref'`` the reference image repeated (Shot) or ``pad='zero'`` zeros (Film) for the remaining frames."""
    cond = to_float(cond_u8)
    m = cond.shape[0]
    if not 1 <= m <= num_frames:
        raise ValueError(f"{m} condition frames for a {num_frames}-frame clip")
    rest = num_frames - m
    if pad == "ref":
        padding = np.broadcast_to(to_float(reference_u8)[None], (rest,) + cond.shape[1:])
    elif pad == "zero":
        padding = np.zeros((rest,) + cond.shape[1:], np.float32)
    else:
        raise ValueError(f"pad must be 'ref' or 'zero', got {pad!r}")
    return np.concatenate([cond, padding], axis=0)


def motion_latent_frames(motion_frames: int, temporal: int = 4) -> int:
    """Latent frames that hold ``m`` leading pixel frames (the first alone, then ``temporal`` per latent)."""
    return 1 + (motion_frames - 1 + temporal - 1) // temporal


# ------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class ChainState:
    """What clip ``clip`` is conditioned on: the condition frames (uint8 ``[m', H, W, 3]``) and, for latent
    chaining, the previous clip's last latent frames (``[n, h, w, C]``, ``None`` before the first clip)."""

    clip: int
    cond_frames: np.ndarray
    cond_latents: Optional[np.ndarray] = None

    def arrays(self) -> dict:
        out = {"cond_frames": self.cond_frames}
        if self.cond_latents is not None:
            out["cond_latents"] = self.cond_latents
        return out


@dataclasses.dataclass
class ClipResult:
    """One finished clip, as :meth:`ClipLoop.clips` yields it."""

    clip: int                    # its index k
    prompt: str
    seed: int                    # the seed its noise was drawn from
    frames: np.ndarray           # uint8 [T, H, W, 3]: every decoded frame
    segment: np.ndarray          # the frames that become its segment of the stitched video (sampler.segment_frames)
    tail: np.ndarray             # its last m frames, held back (the stitched video's end after the last clip)
    latents: jax.Array           # the denoised latents [1, F, h, w, C]
    state: ChainState            # what the next clip is conditioned on
    timings: dict                # condition_s, sample_s, s_per_step, decode_s
    record: dict = dataclasses.field(default_factory=dict)   # clip_setup's record entries (a per-clip schedule)
    compile_s: Optional[float] = None                         # set on a clip that compiled the sampler first


class ClipLoop:
    """The per-clip loop of a sampler that has ``initial_state``, ``conditioning``, ``compile``, ``sample``,
    ``decode``, ``next_state``, ``segment_frames``, ``T``, ``m``, ``num_steps`` and ``compile_s``."""

    def tail_frames(self, frames: np.ndarray) -> np.ndarray:
        """A clip's last ``m`` frames, held back until the next clip (the stitched video's end after the last)."""
        return frames[self.T - self.m:]

    def clips(self, reference_u8: np.ndarray, prompts: Sequence[str], seed: int = 0, seed_times: int = 42, *,
              state: Optional[ChainState] = None, repeat_first_clip: bool = False,
              clip_setup: Optional[Callable[[int], tuple[int, dict]]] = None, step_bar=None,
              precompile: bool = False) -> Iterator[ClipResult]:
        """Clips ``state.clip .. len(prompts) - 1`` (from the first clip without ``state``), prompt ``k`` and seed
        ``seed + k * seed_times`` for clip ``k``. ``clip_setup(k) -> (seed, record entries)`` sets the sampler up
        for clip ``k`` first (:class:`svi_jax.schedule.ClipRunner`); ``step_bar`` (``start(k, steps, desc)``,
        ``close()``) brackets the denoising; ``precompile`` compiles the sampler ahead of its first use, timed apart
        from the steps (``ClipResult.compile_s``)."""
        if state is None:
            state = self.initial_state(reference_u8, repeat_first_clip)
        for k in range(state.clip, len(prompts)):
            prompt, s, extra = prompts[k], clip_seed(seed, k, seed_times), {}
            t0 = time.perf_counter()
            if clip_setup is not None:
                s, extra = clip_setup(k)
            y, clip_fea = self.conditioning(state, reference_u8)
            jax.block_until_ready(y)
            t1 = time.perf_counter()
            compile_s = None
            if precompile and self.compile_s is None:
                compile_s = round(self.compile(prompt, y, clip_fea), 3)
                t1 = time.perf_counter()
            if step_bar is not None:
                step_bar.start(k, self.num_steps, desc=f"clip {k + 1} steps")
            latents = self.sample(prompt, y, clip_fea, s, k)
            jax.block_until_ready(latents)
            if step_bar is not None:
                step_bar.close()
            t2 = time.perf_counter()
            frames = self.decode(latents)
            t3 = time.perf_counter()
            nxt = self.next_state(state, frames, latents)
            timings = {"condition_s": round(t1 - t0, 4), "sample_s": round(t2 - t1, 4),
                       "s_per_step": round((t2 - t1) / self.num_steps, 5), "decode_s": round(t3 - t2, 4)}
            yield ClipResult(k, prompt, s, frames, self.segment_frames(state, frames), self.tail_frames(frames),
                             latents, nxt, timings, extra, compile_s)
            state = nxt

