"""Chained (autoregressive) generation for the drift experiment, in memory, with the official chaining rules.

Shot: clip k+1 is conditioned on the last decoded frame of clip k (1 motion frame), padded with the reference image;
Film: on the last 5 decoded frames, zero padding. CLIP sees the first condition frame; the mask marks frame 0; the
stitched video drops the last ``m`` frames of every clip but the final one. Seed of clip k = ``seed * 1000 + k``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.conditioning import build_y


class Roller:
    def __init__(self, config, dit_dir: str, lora: str | None, film: bool, num_steps: int = 50,
                 cfg_scale: float = 1.0):
        from svi_jax import pipeline
        from svi_jax.models.dit import DiT
        from svi_jax.sampler import make_sampler

        self.config = config
        self.film = film
        self.m = 5 if film else 1
        self.T = int(config.data.num_frames)
        self.H, self.W = int(config.data.height), int(config.data.width)
        dit = DiT.from_dir(dit_dir, lora=lora, lora_scale=1.0)
        self.dit_cfg, self.params = dit.config, dit.params
        self.codec = pipeline.Codec.from_config(config)
        self.t5_cfg, self.t5_params, self.tok = pipeline.make_text_encoder(config)
        self.clip_cfg, self.clip_params = pipeline.make_image_encoder(config)
        self.sample = make_sampler(self.dit_cfg, num_steps=num_steps, cfg_scale=cfg_scale)
        self._encode = jax.jit(self._encode_fn)
        self._decode = jax.jit(self.codec.decode)

    @property
    def new_frames_per_clip(self) -> int:
        return self.T - self.m

    @property
    def first_clip_frames(self) -> int:
        return self.T - self.m

    def total_frames(self, num_clips: int) -> int:
        return num_clips * (self.T - self.m) + self.m

    def _encode_fn(self, cond_video, first):
        from svi_jax.models.clip import CLIPVisionTower, preprocess

        z = self.codec.encode(self.codec.params, cond_video)
        y = build_y(z, self.T)
        clip = CLIPVisionTower(self.clip_cfg).apply({"params": self.clip_params}, preprocess(first, self.clip_cfg))
        return y, clip

    def _text(self, prompt):
        from svi_jax.models.t5 import UMT5

        ids, mask = self.tok([prompt, ""])
        ctx = UMT5(self.t5_cfg).apply({"params": self.t5_params}, jnp.asarray(ids), jnp.asarray(mask))
        return ctx[:1], ctx[1:]

    def rollout(self, reference_u8: np.ndarray, prompt: str, num_clips: int, seed: int) -> np.ndarray:
        """uint8 ``[total_frames, H, W, 3]`` stitched video."""
        ref = jnp.asarray(reference_u8, jnp.float32)[None] / 127.5 - 1.0              # [1, H, W, 3]
        ctx, neg = self._text(prompt)
        cond_frames = ref[:, None]                                                     # [1, m', H, W, 3]
        out = []
        lat_shape = None
        for k in range(num_clips):
            m = cond_frames.shape[1]
            pad = jnp.zeros((1, self.T - m, self.H, self.W, 3)) if self.film else \
                jnp.broadcast_to(ref[:, None], (1, self.T - m, self.H, self.W, 3))
            y, clip = self._encode(jnp.concatenate([cond_frames, pad], axis=1), cond_frames[:, 0])
            if lat_shape is None:
                lat_shape = y.shape[:-1] + (self.dit_cfg.out_dim,)
            noise = jax.random.normal(jax.random.key(seed * 1000 + k), lat_shape)
            z = self.sample(self.params, noise, ctx, neg, clip, y)
            video = self._decode(self.codec.params, z)                                 # [1, T, H, W, 3]
            keep = video[0] if k == num_clips - 1 else video[0, : self.T - self.m]
            out.append(np.asarray(keep))
            cond_frames = video[:, self.T - self.m:]
        frames = np.concatenate(out, axis=0)
        return np.clip(np.rint((frames + 1.0) * 127.5), 0, 255).astype(np.uint8)
