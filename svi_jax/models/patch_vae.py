"""A fixed, exactly invertible "VAE" for small experiments: Wan's time packing and a space-to-depth patch.

Video ``[B, 1 + 4k, H, W, 3]`` -> latents ``[B, 1 + k, H/s, W/s, 4 s^2 3]``: the first frame is repeated 4x (as Wan's
VAE packs it alone), then every 4 frames and every ``s x s`` pixels become one latent pixel. Decoding inverts it (the
first frame is the mean of its 4 copies). No parameters, no training, no reconstruction error: in the drift
experiment (``docs/drift.md``) all drift then comes from the DiT and the chaining, not from a lossy autoencoder.
"""
from __future__ import annotations

import dataclasses

import einops
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PatchVAEConfig:
    spatial: int = 4
    temporal: int = 4
    channels: int = 3
    scale: float = 0.5        # normalize(z) = z / scale (pixels in [-1, 1] have std ~0.5)

    @property
    def z_dim(self) -> int:
        return self.temporal * self.spatial * self.spatial * self.channels

    @classmethod
    def from_dict(cls, d) -> "PatchVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


def encode(cfg: PatchVAEConfig, video):
    t = cfg.temporal
    if (video.shape[1] - 1) % t:
        raise ValueError(f"video has {video.shape[1]} frames, expected 1 + {t}k")
    frames = jnp.concatenate([jnp.repeat(video[:, :1], t, axis=1), video[:, 1:]], axis=1)
    return einops.rearrange(frames, "b (f t) (h p) (w q) c -> b f h w (t p q c)", t=t, p=cfg.spatial, q=cfg.spatial)


def decode(cfg: PatchVAEConfig, z):
    t = cfg.temporal
    frames = einops.rearrange(z, "b f h w (t p q c) -> b (f t) (h p) (w q) c", t=t, p=cfg.spatial, q=cfg.spatial,
                              c=cfg.channels)
    first = jnp.mean(frames[:, :t], axis=1, keepdims=True)
    return jnp.concatenate([first, frames[:, t:]], axis=1)
