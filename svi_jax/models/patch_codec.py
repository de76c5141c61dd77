"""A fixed, exactly invertible codec for small experiments (not a VAE): Wan's time packing and a space-to-depth patch.

Video ``[B, 1 + 4k, H, W, 3]`` -> latents ``[B, 1 + k, H/s, W/s, 4 s^2 3]``: the first frame is repeated 4x (as Wan's
VAE packs it alone), then every 4 frames and every ``s x s`` pixels become one latent pixel. Decoding inverts it (the
first frame is the mean of its 4 copies). No parameters, no training, no reconstruction error: in the drift
experiment (``docs/drift.md``) all drift then comes from the DiT and the chaining, not from a lossy autoencoder.

With ``components = k > 0`` the patch vector is further projected on its first ``k`` principal components (a linear
autoencoder fitted in closed form by :func:`fit_pca` on training clips; ``params = {mean, basis, std}``, stored in an
``.npz`` named by ``basis``): Wan's own token shape (z 16, DiT patch 2 x 2 -> 64 numbers per token) at a 2x spatial
patch. Encoding is ``(p - mean) @ basis / std``, decoding the least-squares inverse ``(z * std) @ basis.T + mean``.
"""
from __future__ import annotations

import dataclasses

import einops
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PatchCodecConfig:
    spatial: int = 4
    temporal: int = 4
    channels: int = 3
    scale: float = 0.5        # normalize(z) = z / scale (pixels in [-1, 1] have std ~0.5); unused with components
    components: int = 0       # > 0: keep this many principal components of the patch vector (needs `basis`)
    basis: str = ""           # .npz with mean [P], basis [P, k], std [k] (P = patch_dim), from fit_pca

    @property
    def patch_dim(self) -> int:
        return self.temporal * self.spatial * self.spatial * self.channels

    @property
    def z_dim(self) -> int:
        return self.components or self.patch_dim

    @classmethod
    def from_dict(cls, d) -> "PatchCodecConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


def encode(cfg: PatchCodecConfig, video):
    t = cfg.temporal
    if (video.shape[1] - 1) % t:
        raise ValueError(f"video has {video.shape[1]} frames, expected 1 + {t}k")
    frames = jnp.concatenate([jnp.repeat(video[:, :1], t, axis=1), video[:, 1:]], axis=1)
    return einops.rearrange(frames, "b (f t) (h p) (w q) c -> b f h w (t p q c)", t=t, p=cfg.spatial, q=cfg.spatial)


def decode(cfg: PatchCodecConfig, z):
    t = cfg.temporal
    frames = einops.rearrange(z, "b f h w (t p q c) -> b (f t) (h p) (w q) c", t=t, p=cfg.spatial, q=cfg.spatial,
                              c=cfg.channels)
    first = jnp.mean(frames[:, :t], axis=1, keepdims=True)
    return jnp.concatenate([first, frames[:, t:]], axis=1)


# ------------------------------------------------------------------------------------- the PCA projection


def fit_pca(cfg: PatchCodecConfig, videos, components: int) -> dict:
    """Closed-form linear autoencoder: the first ``components`` principal directions of the patch vectors of
    ``videos`` ``[N, 1+4k, H, W, 3]`` in [-1, 1]; ``std`` makes every latent channel unit-variance on that data."""
    import numpy as np

    z = np.asarray(encode(cfg, jnp.asarray(videos, jnp.float32)), np.float64).reshape(-1, cfg.patch_dim)
    mean = z.mean(0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    basis = vt[:components].T
    std = s[:components] / np.sqrt(len(z))
    return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float32), "std": std.astype(np.float32)}


def load_params(cfg: PatchCodecConfig) -> dict:
    """``{}`` for the exact codec; the PCA arrays from ``cfg.basis`` otherwise (checked against the config)."""
    import numpy as np

    if not cfg.components:
        return {}
    if not cfg.basis:
        raise ValueError("config.encoders.vae.components > 0 needs config.encoders.vae.basis (an .npz from fit_pca)")
    with np.load(cfg.basis) as f:
        params = {k: jnp.asarray(f[k], jnp.float32) for k in ("mean", "basis", "std")}
    want = (cfg.patch_dim, cfg.components)
    if tuple(params["basis"].shape) != want:
        raise ValueError(f"{cfg.basis}: basis has shape {tuple(params['basis'].shape)}, the config needs {want}")
    return params


def encode_latents(cfg: PatchCodecConfig, params: dict, video):
    """Normalised latents ``[B, 1+k, H/s, W/s, z_dim]``."""
    p = encode(cfg, video)
    if not cfg.components:
        return p / cfg.scale
    return (p - params["mean"]) @ params["basis"] / params["std"]


def decode_latents(cfg: PatchCodecConfig, params: dict, z):
    """Video ``[B, 1+4k, H, W, 3]`` in [-1, 1] from normalised latents."""
    if cfg.components:
        p = (z * params["std"]) @ params["basis"].T + params["mean"]
    else:
        p = z * cfg.scale
    return jnp.clip(decode(cfg, p), -1.0, 1.0)


PatchVAEConfig = PatchCodecConfig   # the old name (svi_jax.models.patch_vae)
