"""I2V conditioning as the official SVI pipeline builds it (``encode_images_adaptive``), channels-last.

``y = mask (4 ch) ++ normalize(VAE(cond))`` where ``cond`` is the condition frame(s) followed by padding frames
(a random frame of the clip for Shot/Talk/Dance -- the reference image at inference -- or zeros for Film), and the
mask marks only pixel frame 0 (the official default ``ref_pad_cfg=False``), repeated 4x to match the VAE's time
packing: latent frame 0 has all four mask channels set, every other latent frame none.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MASK_CHANNELS = 4


def i2v_mask(num_frames: int, lat_h: int, lat_w: int, num_marked: int = 1) -> np.ndarray:
    """``[1 + (T-1)/4, h, w, 4]`` float32 mask for ``T`` pixel frames with the first ``num_marked`` marked."""
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 1 + 4k, got {num_frames}")
    m = np.zeros((num_frames,), np.float32)
    m[:num_marked] = 1.0
    m = np.concatenate([np.repeat(m[:1], 4), m[1:]])          # first frame repeated 4x -> 4 * F_lat entries
    m = m.reshape(-1, MASK_CHANNELS)                           # [F_lat, 4]
    return np.broadcast_to(m[:, None, None, :], (m.shape[0], lat_h, lat_w, MASK_CHANNELS)).copy()


def build_y(cond_latents, num_frames: int, num_marked: int = 1):
    """``mask ++ cond_latents`` for a batch of (normalised) condition latents ``[B, F, h, w, C]``."""
    b, f, h, w, _ = cond_latents.shape
    mask = jnp.asarray(i2v_mask(num_frames, h, w, num_marked), cond_latents.dtype)
    if mask.shape[0] != f:
        raise ValueError(f"{num_frames} pixel frames give {mask.shape[0]} latent frames, the latents have {f}")
    return jnp.concatenate([jnp.broadcast_to(mask, (b,) + mask.shape), cond_latents], axis=-1)


def pro_y16(anchor_latent, motion_latents, num_latents: int):
    """SVI 2.0 Pro's ``[B, F, h, w, C]``: the anchor latent, the motion latent(s) (``None`` for clip 0), zero
    latents; training (:class:`svi_jax.conditioners.ProConditioner`) and sampling (:mod:`svi_jax.pro`) both use it."""
    parts = [anchor_latent] + ([] if motion_latents is None else [motion_latents.astype(anchor_latent.dtype)])
    used = sum(p.shape[1] for p in parts)
    if used > num_latents:
        raise ValueError(f"{used} conditioning latents do not fit in {num_latents} latent frames")
    b, _, h, w, c = anchor_latent.shape
    parts.append(jnp.zeros((b, num_latents - used, h, w, c), anchor_latent.dtype))
    return jnp.concatenate(parts, axis=1)
