"""Flow matching as the official SVI / DiffSynth Wan pipelines do it.

The official Wan/SVI pipelines build ``FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)``
(``diffsynth/pipelines/svi_video.py``): the sigma grid is ``linspace(1, 0, N + 1)[:-1]`` (the extra step drops
sigma 0), shifted by ``shift * s / (1 + (shift - 1) * s)``; timestep ``t = 1000 * sigma``.
(The scheduler's constructor default, sigma_min = 0.003/1.002 without the extra step, is *not* what SVI uses.)

Training: N = 1000, timestep id uniform in 0..999, ``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, loss weight
``exp(-2 ((t - N/2) / N)^2)`` shifted to min 0 and normalised to sum N.
Sampling: N = 50 Euler steps ``x <- x + v (s_next - s)`` with ``s`` after the last step 0.

All functions return NumPy float32 arrays (they are constants for jit) unless they take traced input.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0


def sigmas(num_steps: int, shift: float = DEFAULT_SHIFT, denoising_strength: float = 1.0) -> np.ndarray:
    """The official sigma grid (descending, length ``num_steps``), computed in float64 then cast."""
    sigma_min, sigma_max = 0.0, 1.0
    start = sigma_min + (sigma_max - sigma_min) * denoising_strength
    s = np.linspace(start, sigma_min, num_steps + 1, dtype=np.float64)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return s.astype(np.float32)


def timesteps(num_steps: int, shift: float = DEFAULT_SHIFT) -> np.ndarray:
    return (sigmas(num_steps, shift).astype(np.float64) * NUM_TRAIN_TIMESTEPS).astype(np.float32)


def training_weights(shift: float = DEFAULT_SHIFT, num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Per-timestep-id loss weights ("bsmntw"), summing to ``num_steps``."""
    t = timesteps(num_steps, shift).astype(np.float64)
    y = np.exp(-2.0 * ((t - num_steps / 2) / num_steps) ** 2)
    y = y - y.min()
    return (y * (num_steps / y.sum())).astype(np.float32)


def add_noise(x0, eps, sigma):
    """``x_t = (1 - sigma) x0 + sigma eps``; ``sigma`` broadcast over the trailing dims."""
    sigma = _bcast(sigma, x0)
    return (1.0 - sigma) * x0 + sigma * eps


def velocity_target(x0, eps):
    return eps - x0


def euler_step(x, v, sigma, sigma_next):
    return x + v * _bcast(sigma_next - sigma, x)


def _bcast(s, like):
    s = jnp.asarray(s, dtype=jnp.float32)
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))
