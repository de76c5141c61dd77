"""Error banks for Error-Recycling Fine-Tuning, as fixed-shape device arrays updated inside jit.

A bank holds up to ``K`` errors for each of ``G`` timestep grids (the ``G`` inference timesteps at the
sampling shift). The official code (``train_svi.py``, ``_add_error_to_*_buffer`` with
``--buffer_replacement_strategy l2_batch``) keeps Python lists per grid; the semantics here are the same:

* a training timestep maps to the grid of the nearest inference timestep (``_get_timestep_grid``: ``t``
  clamped to [0, 999], then ``argmin |timesteps - t|``, first index on ties);
* insert appends while the grid holds fewer than ``K`` errors, otherwise overwrites the stored error at the
  smallest L2 distance to the new one (flattened whole tensor; first index on ties);
* sampling is uniform over the grid's stored errors (``random.choice``), or over every stored error of every
  grid for the image error (``--y_error_sample_from_all_grids``).

Deliberate differences from the official code (documented here as the brief asks):

* distances are computed in float32 between the stored representation of each entry and of the new error.
  The official ``torch.norm`` over bf16 tensors returns bf16 distances, so near-equal distances tie and the
  lowest index wins more often than it should; fp32 removes that artefact.
* non-finite errors are never inserted (the official code would store them).
* an optional int8 storage mode (per-entry absmax scale) halves the memory of bf16 storage.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from svi_jax import flow

INT8_MAX = 127.0


class Bank(NamedTuple):
    """One error bank. ``scale`` is ``None`` unless the bank stores int8 (then ``[G, K]`` float32)."""

    errors: jax.Array  # [G, K, *shape], storage dtype
    count: jax.Array  # [G] int32, entries stored per grid (<= K)
    scale: Optional[jax.Array] = None  # [G, K] float32 in int8 mode

    @property
    def num_grids(self) -> int:
        return self.errors.shape[0]

    @property
    def capacity(self) -> int:
        return self.errors.shape[1]

    @property
    def entry_shape(self) -> tuple:
        return tuple(self.errors.shape[2:])

    @property
    def quantized(self) -> bool:
        return self.scale is not None


def _is_int8(dtype) -> bool:
    return np.dtype(dtype) == np.dtype(np.int8)


def init_bank(num_grids: int, capacity: int, shape: Sequence[int], dtype=jnp.bfloat16) -> Bank:
    """An empty bank ``errors [num_grids, capacity, *shape]``; ``dtype=jnp.int8`` selects int8 storage."""
    if num_grids < 1 or capacity < 1:
        raise ValueError(f"num_grids and capacity must be >= 1, got {num_grids}, {capacity}")
    shape = tuple(int(s) for s in shape)
    if _is_int8(dtype):
        return Bank(jnp.zeros((num_grids, capacity) + shape, jnp.int8),
                    jnp.zeros((num_grids,), jnp.int32),
                    jnp.zeros((num_grids, capacity), jnp.float32))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"bank dtype must be a float type or int8, got {np.dtype(dtype)}")
    return Bank(jnp.zeros((num_grids, capacity) + shape, dtype), jnp.zeros((num_grids,), jnp.int32), None)


def bank_nbytes(num_grids: int, capacity: int, shape: Sequence[int], dtype=jnp.bfloat16) -> int:
    """Bytes of one bank (errors + count + scale) without allocating it."""
    n = num_grids * capacity * int(np.prod(shape))
    if _is_int8(dtype):
        return n + 4 * num_grids + 4 * num_grids * capacity
    return n * np.dtype(dtype).itemsize + 4 * num_grids


def grid_timesteps(num_grids: int = 50, shift: float = flow.DEFAULT_SHIFT, offset: int = 0,
                   steps: int = 0) -> np.ndarray:
    """The grids' timesteps (descending): the ``num_grids`` inference timesteps, or -- with ``steps`` > 0 -- the
    slice ``[offset, offset + num_grids)`` of the ``steps``-step inference grid (one Wan2.2 expert's side of the
    boundary, :mod:`svi_jax.pro`)."""
    if not steps:
        if offset:
            raise ValueError("grid offset needs the full grid's step count (erft.grid_steps)")
        return flow.timesteps(num_grids, shift)
    if offset < 0 or offset + num_grids > steps:
        raise ValueError(f"grids [{offset}, {offset + num_grids}) are not inside a {steps}-step grid")
    return flow.timesteps(steps, shift)[offset:offset + num_grids]


def grid_of(t, num_grids: int = 50, shift: float = flow.DEFAULT_SHIFT, offset: int = 0, steps: int = 0):
    """Grid index (int32, same shape as ``t``) of the nearest of the grids' timesteps (:func:`grid_timesteps`)."""
    grid_t = jnp.asarray(grid_timesteps(num_grids, shift, offset, steps))  # descending, [G]
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 999.0)
    return jnp.argmin(jnp.abs(grid_t - t[..., None]), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- storage


def encode(bank: Bank, error):
    """``error`` (float) -> (stored entry in the bank's dtype, float32 scale or None)."""
    e = jnp.asarray(error, jnp.float32)
    if not bank.quantized:
        return e.astype(bank.errors.dtype), None
    scale = jnp.max(jnp.abs(e)) / INT8_MAX
    q = jnp.round(e / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def decode(stored, scale=None):
    """Stored entries -> float32; ``scale`` broadcasts over the trailing dims of ``stored``."""
    x = stored.astype(jnp.float32)
    if scale is None:
        return x
    scale = jnp.asarray(scale, jnp.float32)
    return x * scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))


def _check_entry(bank: Bank, error, what="error"):
    if tuple(error.shape) != bank.entry_shape:
        raise ValueError(f"{what} shape {tuple(error.shape)} does not match the bank entry shape "
                         f"{bank.entry_shape}")


# ------------------------------------------------------------------------------------------------ insert


def _update_entry(errors, entry, do, start):
    """Write ``entry`` at ``start`` if ``do``; in place under donation, touching only that entry.

    A ``lax.cond`` around a dynamic-update-slice (``where(do, entry, old)`` would make XLA:CPU copy the
    bank), done on a uint16 view for 16-bit floats: XLA:CPU otherwise upcasts a bf16 update to f32 and
    rewrites every element of the bank (in place, but O(bank) instead of O(entry)). The bitcasts are free.
    """
    def write(errs):
        if errs.dtype.itemsize == 2 and jnp.issubdtype(errs.dtype, jnp.floating):
            view = lax.dynamic_update_slice(lax.bitcast_convert_type(errs, jnp.uint16),
                                            lax.bitcast_convert_type(entry, jnp.uint16), start)
            return lax.bitcast_convert_type(view, errs.dtype)
        return lax.dynamic_update_slice(errs, entry, start)

    return lax.cond(do, write, lambda errs: errs, errors)


def _nearest(bank: Bank, grid, new):
    """Index of the stored entry of ``grid`` at the smallest squared L2 distance (fp32) to ``new``."""
    rows = lax.dynamic_index_in_dim(bank.errors, grid, 0, keepdims=False)  # [K, *shape]
    rows_scale = None if bank.scale is None else lax.dynamic_index_in_dim(bank.scale, grid, 0, keepdims=False)
    # a sum over the entry axes, not a reshape to [K, -1]: on a mesh the entries are split along their own axes and
    # flattening them would make XLA gather the grid's K whole entries (4 GB in f32 at 81x480x832)
    d2 = jnp.sum(jnp.square(decode(rows, rows_scale) - new[None]), axis=tuple(range(1, rows.ndim)))
    return jnp.argmin(d2).astype(jnp.int32)


def insert(bank: Bank, grid, error, valid=True) -> Bank:
    """Insert ``error`` into ``grid``: append while the grid holds < K, else replace the nearest (L2) entry.

    Nothing changes if ``valid`` is False or ``error`` has a non-finite value. Only one entry (and one count,
    one scale) is written with ``dynamic_update_slice``, so under ``jit`` with the bank donated the update
    happens in place. The distance scan over the grid's K entries runs only when the grid is full.
    """
    _check_entry(bank, error)
    G, K = bank.num_grids, bank.capacity
    grid = jnp.clip(jnp.asarray(grid, jnp.int32), 0, G - 1)
    e = jnp.asarray(error, jnp.float32)
    q, s = encode(bank, e)
    # Non-finite before or after encoding (e.g. an fp32 value beyond the bf16 range) is never stored.
    finite = jnp.all(jnp.isfinite(e)) & jnp.all(jnp.isfinite(decode(q, s)))
    do = jnp.asarray(valid, jnp.bool_) & finite
    cnt = bank.count[grid]
    full = cnt >= K

    idx = lax.cond(do & full, lambda: _nearest(bank, grid, decode(q, s)),
                   lambda: jnp.minimum(cnt, K - 1).astype(jnp.int32))
    zeros = (0,) * len(bank.entry_shape)
    errors = _update_entry(bank.errors, q[None, None], do, (grid, idx) + zeros)
    count = bank.count.at[grid].set(jnp.where(do & ~full, cnt + 1, cnt))
    scale = bank.scale
    if scale is not None:
        scale = scale.at[grid, idx].set(jnp.where(do, s, scale[grid, idx]))
    return Bank(errors, count, scale)


def insert_many(bank: Bank, grids, errors, valid=None) -> Bank:
    """Insert ``errors [N, *shape]`` at ``grids [N]`` one after another (they may hit the same grid)."""
    n = errors.shape[0]
    grids = jnp.broadcast_to(jnp.asarray(grids, jnp.int32), (n,))
    valid = jnp.ones((n,), jnp.bool_) if valid is None else jnp.broadcast_to(jnp.asarray(valid, jnp.bool_), (n,))
    _check_entry(bank, errors[0], "each error")

    def body(i, b):
        return insert(b, grids[i], lax.dynamic_index_in_dim(errors, i, 0, keepdims=False), valid[i])

    return lax.fori_loop(0, n, body, bank)


# ------------------------------------------------------------------------------------------------ sample


def _read(bank: Bank, grid, idx):
    zeros = (0,) * len(bank.entry_shape)
    row = lax.dynamic_slice(bank.errors, (grid, idx) + zeros, (1, 1) + bank.entry_shape)[0, 0]
    return decode(row, None if bank.scale is None else bank.scale[grid, idx])


def draw(bank: Bank, key, grid):
    """A uniformly drawn stored error of ``grid`` as float32, and ``ok`` (False and zeros when empty)."""
    grid = jnp.clip(jnp.asarray(grid, jnp.int32), 0, bank.num_grids - 1)
    n = bank.count[grid]
    idx = jax.random.randint(key, (), 0, jnp.maximum(n, 1), dtype=jnp.int32)
    ok = n > 0
    return jnp.where(ok, _read(bank, grid, idx), 0.0), ok


def draw_pooled(bank: Bank, key):
    """A uniformly drawn error among every stored entry of every grid (float32), and ``ok``."""
    cum = jnp.cumsum(bank.count)
    total = cum[-1]
    r = jax.random.randint(key, (), 0, jnp.maximum(total, 1), dtype=jnp.int32)
    grid = jnp.minimum(jnp.searchsorted(cum, r, side="right"), bank.num_grids - 1).astype(jnp.int32)
    idx = (r - (cum[grid] - bank.count[grid])).astype(jnp.int32)
    ok = total > 0
    return jnp.where(ok, _read(bank, grid, idx), 0.0), ok


sample, sample_pooled = draw, draw_pooled   # deprecated names (one release): a bank draw is not a video sample


def init_banks(shape, num_grids: int = 50, capacity: int = 500, dtype=None) -> dict:
    """``{'noise': Bank, 'latent': Bank}``, both empty (bf16 unless ``dtype`` says otherwise)."""
    dtype = jnp.bfloat16 if dtype is None else dtype
    return {name: init_bank(num_grids, capacity, shape, dtype) for name in ("noise", "latent")}
