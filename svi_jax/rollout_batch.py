"""Many rollouts of one sampler as one batch: B long videos, each from its own reference, prompts and seed, chained
clip by clip through the one per-clip loop (:class:`svi_jax.clip_loop.ClipLoop`) with every array batched.

The drift experiment rolls each model out from every held-out start with every seed (20 rollouts of 20 clips); on
a CPU one batch-20 forward costs far less than 20 forwards of batch 1. Rollout ``b`` is the one
:meth:`svi_jax.long_video.LongVideoSampler.rollout` makes alone from ``references[b]``, ``prompts[k][b]`` and
``seeds[b]`` -- the same conditioning, the same noise (drawn per rollout from ``seed_b + seed_times * k`` as the
sampler draws it) -- up to the float rounding of a batched matmul (tested: uint8 frames within 2).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.clip_loop import ChainState, ClipLoop, to_uint8
from svi_jax.prompts import clip_seed


class RolloutBatch(ClipLoop):
    """The per-clip steps of ``sampler`` (a :class:`~svi_jax.long_video.LongVideoSampler`) over a batch of rollouts:
    the chain state holds ``[B, m, H, W, 3]`` condition frames, a clip's prompt is a tuple of B prompts."""

    def __init__(self, sampler, seeds: Sequence[int], seed_times: int = 42):
        if sampler.streams or sampler.chain != "pixel":
            raise ValueError("batched rollouts support pixel chaining without condition streams")
        self.sampler, self.seeds, self.seed_times = sampler, [int(s) for s in seeds], int(seed_times)
        self.T, self.m, self.num_steps = sampler.T, sampler.m, sampler.num_steps
        self.compile_s = None

    def _one(self, state: ChainState, b: int) -> ChainState:
        return ChainState(state.clip, state.cond_frames[b])

    def initial_state(self, references, repeat_first_clip: bool = False) -> ChainState:
        states = [self.sampler.initial_state(r, repeat_first_clip) for r in references]
        return ChainState(0, np.stack([s.cond_frames for s in states]))

    def conditioning(self, state: ChainState, references):
        ys, clips = zip(*(self.sampler.conditioning(self._one(state, b), r) for b, r in enumerate(references)))
        return jnp.concatenate(ys), jnp.concatenate(clips)

    def _args(self, prompts, y, clip_fea, k: int):
        s = self.sampler
        if len(prompts) != len(self.seeds):
            raise ValueError(f"{len(prompts)} prompts for a batch of {len(self.seeds)} rollouts")
        ctx = _stack_padded([s.encode_text(p) for p in prompts])
        neg = s.encode_text(s.negative_prompt) if s.cfg_scale != 1.0 else ctx    # [1, L, D]: the denoiser broadcasts it
        noise = jnp.concatenate([s.noise(y[b:b + 1], clip_seed(seed, k, self.seed_times))
                                 for b, seed in enumerate(self.seeds)])
        return s.params, noise, ctx, neg, clip_fea, y, None, None, None

    def compile(self, prompts, y, clip_fea) -> float:
        import time

        t0 = time.perf_counter()
        self.sampler.sample_fn.lower(*self._args(prompts, y, clip_fea, 0)).compile()
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def sample(self, prompts, y, clip_fea, seed: int, clip: int = 0):
        return self.sampler.sample_fn(*self._args(prompts, y, clip_fea, clip))

    def decode(self, latents) -> np.ndarray:
        """uint8 frames ``[B, T, H, W, 3]``."""
        s = self.sampler
        return to_uint8(jax.device_get(s._decode(s.codec.params, latents)))

    def next_state(self, state: ChainState, frames_u8: np.ndarray, latents) -> ChainState:
        return ChainState(state.clip + 1, np.ascontiguousarray(frames_u8[:, self.T - self.m:]))

    def segment_frames(self, state: ChainState, frames: np.ndarray) -> np.ndarray:
        return frames[:, : self.T - self.m]

    def tail_frames(self, frames: np.ndarray) -> np.ndarray:
        return frames[:, self.T - self.m:]

    def rollout(self, references: np.ndarray, prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """uint8 ``[B, total_frames, H, W, 3]``: rollout ``b`` from ``references[b]`` with prompts
        ``prompts[k][b]``, stitched as :meth:`LongVideoSampler.rollout` stitches one."""
        parts, frames = [], None
        for r in self.clips(np.asarray(references), [tuple(p) for p in prompts], 0, self.seed_times):
            frames = r.frames
            parts.append(r.segment)
        if not parts:
            return np.zeros((len(self.seeds), 0, self.sampler.H, self.sampler.W, 3), np.uint8)
        return np.concatenate(parts + [self.tail_frames(frames)], axis=1)


def _stack_padded(feats) -> jax.Array:
    """Text features ``[1, L_i, D]`` -> ``[B, max L, D]``, zero-padded (the DiT pads context with zeros itself)."""
    n = max(f.shape[1] for f in feats)
    return jnp.concatenate([jnp.pad(f, ((0, 0), (0, n - f.shape[1]), (0, 0))) for f in feats])
