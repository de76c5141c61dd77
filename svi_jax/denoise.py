"""The flow-matching sampler: the whole denoising loop of one clip as one compiled function.

``make_sampler(dit_config, num_steps, shift, cfg_scale, solver)`` returns a jitted
``sample(params, noise, context, neg_context, clip_fea, y, lora=None) -> latents``:

* ``noise [B, F, h, w, C]`` is the start (sigma = 1) latent; ``context`` / ``neg_context`` the UMT5 features of the
  prompt / negative prompt (``[B or 1, L, text_dim]``; lengths may differ, they are zero-padded as the DiT does);
  ``clip_fea [B or 1, 257, image_dim]`` and ``y [B or 1, F, h, w, 4 + C]`` the I2V conditioning (``None`` for T2V).
* Classifier-free guidance ``v = v_u + s (v_c - v_u)`` (the official ``cfg_scale['text']``): the conditional and
  unconditional passes run as one forward of batch ``2B`` (``cfg_batch=True``) or as two forwards
  (``cfg_batch=False``); the default ``None`` picks by backend: two forwards on CPU, where the batch-2 forward
  measured 5-13% slower (``docs/benchmarks.md``), one batch-2 forward on GPU/TPU. With ``cfg_scale == 1`` only the
  conditional pass runs.
* ``solver='euler'``: the official DiffSynth sampler, ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``
  -- the grid :func:`svi_jax.flow.sigmas` and Euler steps ``x += v (s_next - s)`` down to sigma 0.
  ``solver='unipc'``: Wan's ``FlowUniPCMultistepScheduler`` (order 2, bh2, x0-prediction, predictor-corrector,
  lower order at the last step) on Wan's grid ``shift(linspace(0.999, 0, N + 1)[:-1]) ++ [0]``. UniPC is linear in
  the samples and model outputs with coefficients that depend only on the grid; they are computed once on the host
  (float64) and the loop carries the two previous x0 predictions.
* ``lora``: an unmerged LoRA collection (``svi_jax.lora``), applied as ``x W + s (x A) B`` with
  ``dit_config.lora_scale``; the CLI merges instead (no extra cost per step).
* ``extra`` / ``neg_extra`` (optional): dicts of further condition streams for the conditional / unconditional pass
  (``WanDiT(extra=...)``; e.g. SVI-Dance's ``{'pose': frames}``, kept in both passes); ``neg_extra`` defaults to
  ``extra``. Pose frames are embedded once per clip (``svi_jax.models.pose.embed_once``), not at every step.
* ``on_step(i)`` (optional) is called from inside the compiled loop after each step (``jax.debug.callback``), for
  progress bars; the callback is part of the compiled function, so pass the same callable every time.

The loop is a ``lax.fori_loop``: compiled once per shape and reused for every clip.
"""
from __future__ import annotations

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from svi_jax import flow

SOLVERS = ("euler", "unipc")

#: The negative prompt of the official SVI inference script (``test_svi.py``).
NEGATIVE_PROMPT = ("bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                   "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
                   "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
                   "fused fingers, still picture, messy background, three legs, many people in the background, "
                   "walking backwards")


# ------------------------------------------------------------------------------------------------ grids


def euler_sigmas(num_steps: int, shift: float = flow.DEFAULT_SHIFT) -> np.ndarray:
    """``num_steps + 1`` sigmas: the official grid and a final 0."""
    return np.concatenate([flow.sigmas(num_steps, shift), np.zeros(1, np.float32)])


def unipc_sigmas(num_steps: int, shift: float = flow.DEFAULT_SHIFT, num_train_timesteps: int = 1000) -> np.ndarray:
    """Wan's UniPC grid (``num_steps + 1`` values, last 0): sigma_max = 1 - 1/1000 before the shift (lambda =
    log(alpha / sigma) is -inf at sigma = 1)."""
    s = np.linspace(1.0 - 1.0 / num_train_timesteps, 0.0, num_steps + 1, dtype=np.float64)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return np.concatenate([s, [0.0]]).astype(np.float32)


def unipc_coefficients(sigmas) -> dict[str, np.ndarray]:
    """Per-step coefficients of UniPC-bh2 (order 2, x0-prediction, lower order at the first and last steps) for a
    flow grid ``sigmas`` (descending, last 0; alpha = 1 - sigma).

    With ``m_i`` the x0 prediction at step ``i`` (``x_i - sigma_i v_i``):

    * corrector (``i > 0``): ``x_i <- cs x_i + ca x_{i-1} + c1 m_{i-1} + c2 m_{i-2} + ct m_i`` (``x_{i-1}`` the
      corrected previous sample; at ``i = 0``: ``cs = 1``, the rest 0);
    * predictor: ``x_{i+1} = px x_i + p0 m_i + p1 m_{i-1}``.
    """
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    if n < 1 or s[-1] != 0.0 or np.any(s[:-1] <= 0) or np.any(s[:-1] >= 1) or np.any(np.diff(s) >= 0):
        raise ValueError("UniPC needs a strictly descending grid in (0, 1) ending with 0")
    alpha = 1.0 - s
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)                         # +inf at sigma = 0

    def update(i_from: int, i_to: int, order: int, corrector: bool):
        """(x coefficient, m0 coefficient, m_prev coefficient, m_t coefficient) of one bh2 update i_from -> i_to."""
        st, a_t = s[i_to], alpha[i_to]
        if st == 0.0:                                           # h = inf: the x0 prediction itself (order 1 only)
            assert order == 1 and not corrector
            return 0.0, 1.0, 0.0, 0.0
        h = lam[i_to] - lam[i_from]
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = np.expm1(hh)                                      # bh2
        rk = (lam[i_from - 1] - lam[i_from]) / h if order == 2 else None
        cx = st / s[i_from]
        c0 = -a_t * h_phi_1
        cprev = ct = 0.0
        if corrector:
            if order == 1:
                rhos = np.array([0.5])
            else:
                h_phi_k = h_phi_1 / hh - 1.0
                b = [h_phi_k / b_h]
                h_phi_k = h_phi_k / hh - 1.0 / 2.0
                b.append(h_phi_k * 2.0 / b_h)
                rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
            # x_t = x_t_ - a_t B_h (sum_k rho_k D1_k + rho_last (m_t - m0)),  D1 = (m_prev - m0) / rk
            ct = -a_t * b_h * rhos[-1]
            c0 += a_t * b_h * rhos[-1]
            if order == 2:
                cprev += -a_t * b_h * rhos[0] / rk
                c0 += a_t * b_h * rhos[0] / rk
        elif order == 2:
            rho = 0.5
            cprev += -a_t * b_h * rho / rk
            c0 += a_t * b_h * rho / rk
        return cx, c0, cprev, ct

    orders = [min(2, n - i, i + 1) for i in range(n)]           # warm-up (order 1 first) and lower_order_final
    out = {k: np.zeros(n, np.float64) for k in ("cs", "ca", "c1", "c2", "ct", "px", "p0", "p1")}
    out["cs"][0] = 1.0
    for i in range(n):
        if i > 0:                                                # correct x_i with m_i, using the order of step i-1
            cx, c0, cprev, ct = update(i - 1, i, orders[i - 1], corrector=True)
            out["ca"][i], out["c1"][i], out["c2"][i], out["ct"][i] = cx, c0, cprev, ct
        px, p0, p1, _ = update(i, i + 1, orders[i], corrector=False)
        out["px"][i], out["p0"][i], out["p1"][i] = px, p0, p1
    return {k: v.astype(np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ sampler


def _pad_len(a, length):
    return jnp.pad(a, ((0, 0), (0, length - a.shape[1]), (0, 0)))


def _batch(a, b):
    if a is None:
        return None
    if a.shape[0] == b:
        return a
    if a.shape[0] != 1:
        raise ValueError(f"conditioning batch {a.shape[0]} does not match the latents' batch {b}")
    return jnp.broadcast_to(a, (b,) + a.shape[1:])


def integrate(velocity: Callable, x, sigmas, solver: str = "euler", on_step: Optional[Callable[[int], None]] = None):
    """Integrate ``dx/dsigma = velocity(x, i)`` (``i`` the step index, at ``sigmas[i]``) along ``sigmas``
    (``N + 1`` values, descending, last 0) in one ``lax.fori_loop``: Euler steps, or UniPC-bh2
    (:func:`unipc_coefficients`). Jittable."""
    grid = np.asarray(sigmas, np.float32)
    n = len(grid) - 1
    sig = jnp.asarray(grid)

    def tick(i):
        if on_step is not None:
            jax.debug.callback(on_step, i)

    if solver == "euler":
        def body(i, x):
            x = x + velocity(x, i) * (sig[i + 1] - sig[i])
            tick(i)
            return x

        return jax.lax.fori_loop(0, n, body, x)
    if solver != "unipc":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    c = {k: jnp.asarray(v) for k, v in unipc_coefficients(grid).items()}

    def body_unipc(i, carry):
        x, x_last, m1, m2 = carry
        m = x - sig[i] * velocity(x, i)                    # x0 prediction at the (uncorrected) sample
        x = c["cs"][i] * x + c["ca"][i] * x_last + c["c1"][i] * m1 + c["c2"][i] * m2 + c["ct"][i] * m
        x_next = c["px"][i] * x + c["p0"][i] * m + c["p1"][i] * m1
        tick(i)
        return x_next, x, m, m1

    zeros = jnp.zeros_like(x)
    return jax.lax.fori_loop(0, n, body_unipc, (x, zeros, zeros, zeros))[0]


def resolve_cfg_batch(cfg_batch: Optional[bool]) -> bool:
    """``None`` -> batch the CFG passes unless the default backend is the CPU (see the module doc)."""
    return jax.default_backend() != "cpu" if cfg_batch is None else bool(cfg_batch)


def make_sampler(dit_config, num_steps: int = 50, shift: float = flow.DEFAULT_SHIFT, cfg_scale: float = 5.0,
                 solver: str = "euler", *, cfg_batch: Optional[bool] = None, on_step: Optional[Callable[[int], None]] = None,
                 jit: bool = True):
    """A jitted ``sample(params, noise, context, neg_context, clip_fea, y, lora=None, extra=None, neg_extra=None)
    -> latents`` (see module doc)."""
    from svi_jax.models.dit import WanDiT

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    module = WanDiT(dit_config)
    cfg_batch = resolve_cfg_batch(cfg_batch)
    cfg_scale = float(cfg_scale)
    guided = cfg_scale != 1.0
    grid = euler_sigmas(num_steps, shift) if solver == "euler" else unipc_sigmas(num_steps, shift)
    tgrid = (grid.astype(np.float64) * flow.NUM_TRAIN_TIMESTEPS).astype(np.float32)   # t = 1000 sigma (as flow.py)

    def forward(params, lora, x, t, ctx, clip, y, extra=None):
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        tt = jnp.full((x.shape[0],), t, jnp.float32)
        return module.apply(variables, x, tt, ctx, clip_fea=clip, y=y, extra=extra)

    def sample(params, noise, context, neg_context, clip_fea, y, lora=None, extra=None, neg_extra=None):
        chex.assert_rank(noise, 5)
        b = noise.shape[0]
        from svi_jax.models.pose import embed_once

        neg_extra = extra if neg_extra is None else neg_extra
        ex = None if extra is None else embed_once(dit_config, params, {k: _batch(v, b) for k, v in extra.items()})
        nex = ex if neg_extra is extra else (
            None if neg_extra is None else embed_once(dit_config, params, {k: _batch(v, b) for k, v in neg_extra.items()}))
        x0 = noise.astype(jnp.float32)
        ctx = _batch(context, b)
        clip, yy = _batch(clip_fea, b), _batch(y, b)
        if guided:
            neg = _batch(neg_context, b)
            length = max(ctx.shape[1], neg.shape[1])
            ctx, neg = _pad_len(ctx, length), _pad_len(neg.astype(ctx.dtype), length)
            if cfg_batch:
                ctx2 = jnp.concatenate([ctx, neg], axis=0)
                clip2 = None if clip is None else jnp.concatenate([clip, clip], axis=0)
                y2 = None if yy is None else jnp.concatenate([yy, yy], axis=0)
                ex2 = None if ex is None else {k: jnp.concatenate([ex[k], nex[k]], axis=0) for k in ex}

        def velocity(x, i):
            t = jnp.asarray(tgrid)[i]
            if not guided:
                return forward(params, lora, x, t, ctx, clip, yy, ex)
            if cfg_batch:
                v = forward(params, lora, jnp.concatenate([x, x], axis=0), t, ctx2, clip2, y2, ex2)
                vc, vu = v[:b], v[b:]
            else:
                vc = forward(params, lora, x, t, ctx, clip, yy, ex)
                vu = forward(params, lora, x, t, neg, clip, yy, nex)
            return vu + cfg_scale * (vc - vu)

        return integrate(velocity, x0, grid, solver, on_step)

    return jax.jit(sample) if jit else sample


def reference_sample(forward: Callable, noise, num_steps: int, shift: float, cfg_scale: float, context,
                     neg_context, clip_fea, y):
    """Plain-Python Euler + CFG with two separate passes (the official loop), for tests:
    ``forward(x, t[B], ctx, clip, y) -> v``."""
    grid = euler_sigmas(num_steps, shift)
    x = jnp.asarray(noise, jnp.float32)
    b = x.shape[0]
    for i in range(num_steps):
        t = jnp.full((b,), np.float64(grid[i]) * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)
        vc = forward(x, t, context, clip_fea, y)
        if cfg_scale != 1.0:
            vu = forward(x, t, neg_context, clip_fea, y)
            v = vu + cfg_scale * (vc - vu)
        else:
            v = vc
        x = x + v * (grid[i + 1] - grid[i])
    return x
