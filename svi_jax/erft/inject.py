"""Error injection (before the forward pass) and error curation (after it), as the official ``train_svi.py``.

Official ``training_step`` with ``--use_error_recycling`` (batch 1 per GPU), the names mapped to ours:
``latent_error_buffer`` is our *noise* bank (it receives ``noise_error``), ``y_error_buffer`` our *latent*
bank (it receives ``y_error``). Per example:

* four independent uniforms; ``clean`` with ``p_clean`` cancels all three errors; otherwise noise error with
  ``p_noise`` (noise bank, the example's grid), latent error with ``p_latent`` (latent bank, same grid),
  image error with ``p_image`` (latent bank pooled over all grids, ``--y_error_sample_from_all_grids``);
  an empty bank injects nothing. Each drawn error is scaled by its own ``U(1 - f, 1 + f)``.
* image error: ``start ~ U{0 .. F - n}``, ``y[:, 4:, :n] += err[:, :, start:start + n]`` (torch layout),
  i.e. a random window of ``n = y_error_num`` latent frames of the pooled error, added to the *first* n
  frames of the conditioning-latent channels of ``y`` (never the 4 mask channels).
* ``x_t = (1 - s)(x0 + e_x) + s (eps + e_n)``; ``target = (eps + e_n) - x0``.
* after the forward pass (no gradient): ``scheduler.step(.., to_final=True, self_corr=True)`` goes to
  sigma 1, ``self_corr=False`` to sigma 0, so ``e_n = (1 - s)(v_pred - v)`` and ``e_x = -s (v_pred - v)``.
  They are inserted into the noise and latent banks at the grid of ``t``; errors of clean-input steps only
  with ``p_insert_clean``. For the first ``warmup_steps`` steps (official ``iteration_count <=
  buffer_warmup_iter``, iteration_count starting at 1, i.e. our 0-based ``step < warmup_steps``) every
  replica inserts the all-gathered errors of every replica, in replica order; afterwards only its own.

Differences from the official code, on purpose:

* ``e_n``/``e_x`` are computed directly in fp32; the official subtracts two bf16 one-step predictions,
  which adds bf16 cancellation noise to the stored errors.
* The latent error is injected when the *latent* bank's grid is non-empty (the official code tests the
  noise bank's grid, then returns zeros if the latent bank's grid is empty; both banks always receive the
  same number of errors there, so this is the same unless non-finite errors were dropped from one bank).
* During warm-up the official code gates the whole gathered set by the *receiving* GPU's own clean flag and
  ``p_insert_clean`` draw (``warmup_gate='receiver'``, the default; for batch B > 1 per replica the
  gathered error of batch position b is gated by the receiver's draw for its own example b).
  ``warmup_gate='source'`` gates each error by the flag and draw of the example that produced it, which
  keeps the replicas' banks identical during warm-up.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from svi_jax import flow
from svi_jax.erft.banks import Bank, draw, draw_pooled, grid_of, insert_many

MASK_CHANNELS = 4

# The official Shot script (scripts/train/svi_shot.sh); Film uses p_clean 0.5, Dance y_error_num 1.
DEFAULTS = dict(
    p_noise=0.01,
    p_latent=0.9,
    p_image=0.9,
    p_clean=0.2,
    y_error_num=3,
    error_modulate_factor=0.0,
    num_grids=50,
    shift=flow.DEFAULT_SHIFT,
    capacity=500,
    p_insert_clean=0.1,
    warmup_steps=50,
    warmup_gate="receiver",
    # the grids as a slice [grid_offset, grid_offset + num_grids) of a grid_steps-step inference grid (0 = the
    # num_grids-step grid itself); a Wan2.2 expert's banks hold its side of the boundary only (svi_jax.pro)
    grid_offset=0,
    grid_steps=0,
    # the image error goes to y's latent frames [y_error_start, y_error_start + y_error_num) (official: 0)
    y_error_start=0,
)


def erft_config(**overrides) -> ml_collections.ConfigDict:
    """The ERFT fields with the official Shot defaults, overridden by keyword."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown ERFT config field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict({**DEFAULTS, **overrides})


def _get(cfg: Any, name: str):
    if isinstance(cfg, Mapping):
        return cfg.get(name, DEFAULTS[name])
    return getattr(cfg, name, DEFAULTS[name]) if cfg is not None else DEFAULTS[name]


def _bcast(v, like):
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _check_banks(banks, shape):
    if set(banks) != {"noise", "latent"}:
        raise ValueError(f"banks must be {{'noise': Bank, 'latent': Bank}}, got keys {sorted(banks)}")
    for name, bank in banks.items():
        if bank.entry_shape != tuple(shape):
            raise ValueError(f"{name} bank entries have shape {bank.entry_shape}, but the latents are "
                             f"{tuple(shape)} per example")


# ------------------------------------------------------------------------------------------------ inject


def inject(key, banks: Mapping[str, Bank], x0, y, eps, t, sigma, cfg):
    """Corrupt one training batch with recycled errors.

    ``x0``, ``eps``: ``[B, F, H, W, C]`` (per-example shape = bank entry shape); ``y``: ``[B, F', H, W,
    4 + C]`` or ``None``; ``t``, ``sigma``: ``[B]``. Returns ``(x_t, target, y_new, info)``: ``x_t`` and
    ``target`` in the dtype of ``x0`` (computed in fp32), ``y_new`` in ``y``'s dtype (``None`` if ``y`` is),
    ``info`` per-example float32 flags ``clean``, ``noise_injected``, ``latent_injected``,
    ``image_injected`` (curation needs only ``clean``; it recomputes the errors from ``v_pred``).
    """
    chex.assert_rank(x0, 5)
    chex.assert_equal_shape([x0, eps])
    B = x0.shape[0]
    chex.assert_shape([t, sigma], (B,))
    _check_banks(banks, x0.shape[1:])
    n = int(_get(cfg, "y_error_num"))
    if y is not None:
        chex.assert_rank(y, 5)
        C = x0.shape[-1]
        if y.shape[0] != B or y.shape[2:4] != x0.shape[2:4] or y.shape[-1] != MASK_CHANNELS + C:
            raise ValueError(f"y must be [B, F', H, W, {MASK_CHANNELS} + {C}] for x0 {x0.shape}, got {y.shape}")
        y0 = int(_get(cfg, "y_error_start"))
        if not 1 <= n <= min(x0.shape[1], y.shape[1]) or not 0 <= y0 <= y.shape[1] - n:
            raise ValueError(f"y_error_num={n} must be in 1..{min(x0.shape[1], y.shape[1])} and y_error_start="
                             f"{y0} in 0..{y.shape[1] - n}")

    num_grids, shift = int(_get(cfg, "num_grids")), float(_get(cfg, "shift"))
    if banks["noise"].num_grids != num_grids or banks["latent"].num_grids != num_grids:
        raise ValueError(f"cfg.num_grids={num_grids} but the banks have {banks['noise'].num_grids} and "
                         f"{banks['latent'].num_grids} grids")
    grid = grid_of(t, num_grids, shift, int(_get(cfg, "grid_offset")), int(_get(cfg, "grid_steps")))
    k_u, k_n, k_l, k_i, k_w, k_m = jax.random.split(key, 6)
    u = jax.random.uniform(k_u, (4, B))
    clean = u[3] < _get(cfg, "p_clean")
    want_noise = (u[0] < _get(cfg, "p_noise")) & ~clean
    want_image = (u[1] < _get(cfg, "p_image")) & ~clean
    want_latent = (u[2] < _get(cfg, "p_latent")) & ~clean
    f = float(_get(cfg, "error_modulate_factor"))
    mod = jax.random.uniform(k_m, (3, B), minval=1.0 - f, maxval=1.0 + f)

    per_example = jax.vmap(draw, in_axes=(None, 0, 0))
    e_n, ok_n = per_example(banks["noise"], jax.random.split(k_n, B), grid)
    e_x, ok_x = per_example(banks["latent"], jax.random.split(k_l, B), grid)
    noise_inj = want_noise & ok_n
    latent_inj = want_latent & ok_x
    e_n = _bcast(jnp.where(noise_inj, mod[0], 0.0), e_n) * e_n
    e_x = _bcast(jnp.where(latent_inj, mod[1], 0.0), e_x) * e_x

    s = _bcast(jnp.asarray(sigma, jnp.float32), e_n)
    noise_in = eps.astype(jnp.float32) + e_n
    x_t = (1.0 - s) * (x0.astype(jnp.float32) + e_x) + s * noise_in
    target = noise_in - x0.astype(jnp.float32)

    if y is None:
        y_new, image_inj = None, jnp.zeros((B,), jnp.bool_)
    else:
        e_i, ok_i = jax.vmap(draw_pooled, in_axes=(None, 0))(banks["latent"], jax.random.split(k_i, B))
        image_inj = want_image & ok_i
        start = jax.random.randint(k_w, (B,), 0, x0.shape[1] - n + 1)
        window = jax.vmap(lambda e, s0: lax.dynamic_slice_in_dim(e, s0, n, axis=0))(e_i, start)
        window = _bcast(jnp.where(image_inj, mod[2], 0.0), window) * window
        head = y[:, y0:y0 + n, :, :, MASK_CHANNELS:].astype(jnp.float32) + window
        y_new = y.at[:, y0:y0 + n, :, :, MASK_CHANNELS:].set(head.astype(y.dtype))

    info = dict(clean=clean, noise_injected=noise_inj, latent_injected=latent_inj, image_injected=image_inj)
    info = {k: v.astype(jnp.float32) for k, v in info.items()}
    return x_t.astype(x0.dtype), target.astype(x0.dtype), y_new, info


# ------------------------------------------------------------------------------------------------ curate


def errors_from_prediction(v_pred, target, sigma):
    """``(e_n, e_x) = ((1 - s)(v_pred - v), -s (v_pred - v))`` in fp32, without gradient."""
    d = lax.stop_gradient(v_pred.astype(jnp.float32) - target.astype(jnp.float32))
    s = _bcast(lax.stop_gradient(jnp.asarray(sigma, jnp.float32)), d)
    return (1.0 - s) * d, -s * d


def curate(key, banks: Mapping[str, Bank], t, sigma, v_pred, target, info, step, cfg,
           axis_name: Optional[str] = None):
    """Insert this step's errors into the banks; returns the new banks.

    Call inside the train step after the forward pass. With ``axis_name`` (a ``shard_map``/``pmap`` data
    axis; each replica holds its own banks) every replica inserts the errors of all replicas while
    ``step < warmup_steps`` (``step``: 0-based train step, replicated), afterwards only its own.
    """
    chex.assert_equal_shape([v_pred, target])
    B = v_pred.shape[0]
    _check_banks(banks, v_pred.shape[1:])
    e_n, e_x = errors_from_prediction(v_pred, target, sigma)
    grid = grid_of(t, int(_get(cfg, "num_grids")), float(_get(cfg, "shift")), int(_get(cfg, "grid_offset")),
                   int(_get(cfg, "grid_steps")))
    clean = jnp.asarray(info["clean"]) > 0.5
    gate = ~clean | (jax.random.uniform(key, (B,)) < _get(cfg, "p_insert_clean"))

    def insert_into(bs, grids, en, ex, valid):
        return {"noise": insert_many(bs["noise"], grids, en, valid),
                "latent": insert_many(bs["latent"], grids, ex, valid)}

    if axis_name is None:
        return insert_into(banks, grid, e_n, e_x, gate)

    mode = _get(cfg, "warmup_gate")
    if mode not in ("receiver", "source"):
        raise ValueError(f"warmup_gate must be 'receiver' or 'source', got {mode!r}")

    def gathered(bs):
        def gather(x, dtype=None):
            x = x if dtype is None else x.astype(dtype)
            g = lax.all_gather(x, axis_name)  # [R, B, ...], replica order
            return g.reshape((-1,) + g.shape[2:])

        # A float bank stores the error rounded to its dtype anyway, so gathering in that dtype is exact.
        wire = lambda b: b.errors.dtype if jnp.issubdtype(b.errors.dtype, jnp.floating) else jnp.float32
        grids = gather(grid)
        valid = gather(gate) if mode == "source" else jnp.tile(gate, grids.shape[0] // B)
        return insert_into(bs, grids, gather(e_n, wire(bs["noise"])), gather(e_x, wire(bs["latent"])), valid)

    def local(bs):
        return insert_into(bs, grid, e_n, e_x, gate)

    warm = jnp.asarray(step) < _get(cfg, "warmup_steps")
    return lax.cond(warm, gathered, local, banks)
