"""Handcrafted degradations of the condition frames (the paper's Tab. 7 baseline: colour shift, blur, sharpening).

``degrade(key, frames, strength)`` is pure and jittable; frames ``[B, T, H, W, 3]`` in [-1, 1]. Per example it draws a
per-channel colour offset ``U(-0.1, 0.1) * strength``, then either a Gaussian blur (sigma ``U(0, 1.5) * strength``) or
an unsharp-mask sharpening (amount ``U(0, 1) * strength``), the same for every frame of the example (the condition
frames and the padding anchor are one image or a few consecutive frames).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _gauss_kernel(sigma, radius: int = 3):
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / jnp.maximum(sigma, 1e-3)) ** 2)
    k = k / k.sum()
    return jnp.where(sigma < 1e-3, (x == 0).astype(jnp.float32), k)


def _blur(img, sigma):
    """Separable Gaussian blur of ``[T, H, W, C]`` with edge padding."""
    k = _gauss_kernel(sigma)
    r = (k.shape[0] - 1) // 2
    pad = jnp.pad(img, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h = sum(k[i] * pad[:, i:i + img.shape[1], :, :] for i in range(k.shape[0]))
    return sum(k[i] * h[:, :, i:i + img.shape[2], :] for i in range(k.shape[0]))


def degrade(key, frames, strength: float = 1.0, p: float = 1.0):
    """Degrade each example with probability ``p``; returns ``(frames, applied [B])``."""
    b = frames.shape[0]
    keys = jax.random.split(key, b)

    def one(k, x):
        k1, k2, k3, k4, k5 = jax.random.split(k, 5)
        shift = jax.random.uniform(k1, (3,), minval=-0.1, maxval=0.1) * strength * 2.0   # [-1, 1] pixel units
        sigma = jax.random.uniform(k2, ()) * 1.5 * strength
        amount = jax.random.uniform(k3, ()) * strength
        blurred = _blur(x, sigma)
        sharpened = x + amount * (x - _blur(x, 1.0))
        y = jnp.where(jax.random.bernoulli(k4), blurred, sharpened) + shift
        apply = jax.random.uniform(k5) < p
        return jnp.where(apply, jnp.clip(y, -1.0, 1.0), x), apply

    out, applied = jax.vmap(one)(keys, frames)
    return out, applied.astype(jnp.float32)
