"""Two-expert (Wan2.2-A14B) flow sampling: the high-noise DiT above the boundary, the low-noise DiT below, in one
compiled loop.

``make_expert_sampler(dit_config, num_steps, shift, cfg_scale, solver, boundary=0.875)`` returns a jitted
``sample(experts, noise, context, neg_context, y) -> latents`` where ``experts = {'high': params, 'low': params}``
(each optionally with a merged LoRA) and ``y [B or 1, F, h, w, 4 + C]`` (``None`` for T2V):

* the grid and the solver are :mod:`svi_jax.denoise`'s (Euler = DiffSynth's FlowMatchScheduler, or UniPC); the step
  ``i`` runs the high-noise expert while ``t_i >= boundary * 1000`` and the low-noise one afterwards. The choice is a
  ``lax.cond`` inside the ``fori_loop`` on a per-step flag computed on the host, so the switch happens at exactly
  the step the official loops switch (``wan_video_svi_pro.py`` L293: ``timestep < boundary * 1000`` -> ``dit2``;
  Wan2.2 ``image2video.py`` ``_prepare_model_for_timestep``: ``t >= boundary`` -> high) and never back.
* **Both experts are resident**: their params are operands of the one compiled function (2 x 28.6 GB in bf16 for
  A14B). On a mesh they are split like one DiT's (FSDP over the same axes), so per device each costs what one
  Wan2.1-14B DiT costs; there is no host<->device swap in the loop (``docs/wan22.md``).
* ``cfg_scale``: one scale (SVI Pro) or ``(low, high)`` (Wan2.2's ``sample_guide_scale``: the high-noise expert
  uses the second). ``t_dtype='bfloat16'`` rounds the timestep to bf16 before the model, as SVI's pipeline does
  (``timestep.to(dtype=torch_dtype)``, L299); the grid and the boundary test stay in float32.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from svi_jax import flow
from svi_jax.denoise import (SOLVERS, _batch, _pad_len, euler_sigmas, integrate, resolve_cfg_batch,
                             unipc_sigmas)


def timestep_grid(num_steps: int, shift: float, solver: str = "euler") -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas [N + 1], timesteps [N])`` of the sampler (t = 1000 sigma, float32 as the official tables)."""
    grid = euler_sigmas(num_steps, shift) if solver == "euler" else unipc_sigmas(num_steps, shift)
    t = (grid[:-1].astype(np.float64) * flow.NUM_TRAIN_TIMESTEPS).astype(np.float32)
    return grid, t


def high_steps(timesteps, boundary: float) -> np.ndarray:
    """Per-step flag: the high-noise expert runs (``t >= boundary * 1000``)."""
    return np.asarray(timesteps, np.float32) >= np.float32(boundary * flow.NUM_TRAIN_TIMESTEPS)


def make_expert_sampler(dit_config, num_steps: int = 50, shift: float = flow.DEFAULT_SHIFT,
                        cfg_scale: Union[float, Sequence[float]] = 5.0, solver: str = "euler", *,
                        boundary: float = 0.875, t_dtype: str = "float32", cfg_batch: Optional[bool] = None,
                        on_step: Optional[Callable[[int], None]] = None, jit: bool = True):
    """A jitted ``sample(experts, noise, context, neg_context, y, lora=None)`` (see module doc); ``lora``: optional
    ``{'high': collection, 'low': collection}`` applied unmerged (``x W + s (x A) B``)."""
    from svi_jax.models.dit import WanDiT

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"boundary must be in (0, 1), got {boundary}")
    if t_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"t_dtype must be float32 or bfloat16, got {t_dtype!r}")
    scales = (float(cfg_scale),) * 2 if np.ndim(cfg_scale) == 0 else tuple(float(s) for s in cfg_scale)
    if len(scales) != 2:
        raise ValueError(f"cfg_scale must be one number or (low, high), got {cfg_scale!r}")
    s_low, s_high = scales
    guided = scales != (1.0, 1.0)
    module = WanDiT(dit_config)
    cfg_batch = resolve_cfg_batch(cfg_batch)
    grid, tgrid = timestep_grid(num_steps, shift, solver)
    if t_dtype == "bfloat16":
        tgrid = tgrid.astype(jnp.bfloat16).astype(np.float32)
    use_high = high_steps(timestep_grid(num_steps, shift, solver)[1], boundary)

    def forward(params, lora, x, t, ctx, y):
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        tt = jnp.full((x.shape[0],), t, jnp.float32)
        return module.apply(variables, x, tt, ctx, y=y)

    def guided_velocity(params, lora, x, t, ctx, neg, y, scale):
        if not guided:
            return forward(params, lora, x, t, ctx, y)
        b = x.shape[0]
        if cfg_batch:
            y2 = None if y is None else jnp.concatenate([y, y], axis=0)
            v = forward(params, lora, jnp.concatenate([x, x], axis=0), t, jnp.concatenate([ctx, neg], axis=0), y2)
            vc, vu = v[:b], v[b:]
        else:
            vc = forward(params, lora, x, t, ctx, y)
            vu = forward(params, lora, x, t, neg, y)
        return vu + scale * (vc - vu)

    def sample(experts, noise, context, neg_context, y, lora=None):
        chex.assert_rank(noise, 5)
        b = noise.shape[0]
        lora = lora or {}
        ctx, yy = _batch(context, b), _batch(y, b)
        neg = ctx
        if guided:
            neg = _batch(neg_context, b)
            length = max(ctx.shape[1], neg.shape[1])
            ctx, neg = _pad_len(ctx, length), _pad_len(neg.astype(ctx.dtype), length)
        hi = jnp.asarray(use_high)
        t_tab = jnp.asarray(tgrid)

        def velocity(x, i):
            t = t_tab[i]
            return jax.lax.cond(
                hi[i],
                lambda x: guided_velocity(experts["high"], lora.get("high"), x, t, ctx, neg, yy, s_high),
                lambda x: guided_velocity(experts["low"], lora.get("low"), x, t, ctx, neg, yy, s_low), x)

        return integrate(velocity, noise.astype(jnp.float32), grid, solver, on_step)

    return jax.jit(sample) if jit else sample
