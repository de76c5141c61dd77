"""Few-step distillation LoRAs (LightX2V's Wan2.1 StepDistill/CfgDistill LoRA, the one SVI's maintainers point to
for speed) run on our Euler sampler as their authors run them: ``--num_steps 4 --shift 5 --cfg_scale 1``.

LightX2V samples with ``WanStepDistillScheduler`` (ModelTC/LightX2V,
``lightx2v/models/schedulers/wan/step_distill/scheduler.py``, ``set_denoising_timesteps`` and ``step_post``;
config ``configs/distill/wan_i2v_distill_4step_cfg.json``: ``denoising_step_list [1000, 750, 500, 250]``,
``sample_shift 5``, CFG off), transcribed below. Its grid is a 1000-point shifted linspace indexed at
``1000 - t``; its step is ``x0 = x - sigma v``, then ``x0 + sigma_next v`` (x0 itself at the last step) -- an
Euler step. These tests show that our grid and loop are that sampler, so the recipe in docs/lora.md is exact."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax.denoise import euler_sigmas, integrate


def lightx2v_sigmas(denoising_step_list, shift):
    sigmas = np.linspace(1.0, 0.0, 1000 + 1, dtype=np.float32)[:-1]          # torch.linspace(1, 0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas[[1000 - t for t in denoising_step_list]]


def lightx2v_loop(velocity, x, sigmas):
    for i, sigma in enumerate(sigmas):
        v = velocity(x, float(sigma))
        x = x - sigma * v                                                      # step_post
        if i < len(sigmas) - 1:
            x = x + v * sigmas[i + 1]
    return x


@pytest.mark.parametrize("steps,shift", [([1000, 750, 500, 250], 5.0), ([1000, 875, 750, 625, 500, 375, 250, 125], 5.0),
                                         ([1000, 750, 500, 250], 8.0)])
def test_lightx2v_grid_and_step_are_our_euler(steps, shift):
    ours = euler_sigmas(len(steps), shift)
    np.testing.assert_allclose(ours[:-1], lightx2v_sigmas(steps, shift), rtol=1e-6)
    assert ours[-1] == 0.0
    w = np.random.RandomState(0).randn(6, 6).astype(np.float32) * 0.3

    def vel(x, sigma):                     # a nonlinear stand-in for the DiT, depending on x and the noise level
        return jnp.tanh(x @ w) * (1.0 + sigma) - x

    x = np.random.RandomState(1).randn(3, 6).astype(np.float32)
    grid = jnp.asarray(ours)
    got = jax.jit(lambda x: integrate(lambda x, i: vel(x, grid[i]), x, ours, "euler"))(x)
    want = lightx2v_loop(lambda x, s: np.asarray(vel(jnp.asarray(x), s)), x, lightx2v_sigmas(steps, shift))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_a_uniform_grid_is_not_our_grid():
    """The check can fail: a schedule list that is not uniform (LightX2V allows any) is not a plain ``--num_steps``
    grid, and the tests above would see it."""
    assert not np.allclose(euler_sigmas(4, 5.0)[:-1], lightx2v_sigmas([1000, 900, 600, 250], 5.0))
