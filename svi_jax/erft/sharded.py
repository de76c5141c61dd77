"""ERFT banks on a device mesh: the per-replica / global bank layout and the sharded ``inject`` / ``curate``.

ERFT banks on a mesh (``config.erft.bank_mode``):

* ``'replica'`` (default, the official semantics): ``R`` = ``erft.bank_replicas`` (0: the ``data`` axis size)
  banks, stacked replica-major along the grid axis (``errors [R*G, K, *latent]``) and split by replica over
  ``data``; each entry (a whole latent) is
  additionally split over the replica's other devices (``fsdp``/``context``/``tensor``) along the latent's own
  axes. Example ``b`` of the global batch belongs to replica ``b // (B / R)``; it samples from and inserts into
  its replica's banks (all replicas' errors during warm-up, via ``erft.curate(axis_name=...)``). On a mesh whose
  ``data`` size is ``R`` this runs under ``shard_map`` over ``data`` (each device touches only its replica's
  entries, updates in place); elsewhere (one device, tests) as a ``vmap`` with the same result.
  Memory: ``2 x G x K x |latent|`` bytes per replica, divided by the devices of a replica.
* ``'global'``: one pair of banks shared by all replicas, entries split over *all* devices; every error of the
  global batch is inserted each step (the warm-up behaviour, forever). The nearest-neighbour replacement is the
  same code: each device computes the squared distances over its slice of every entry of the grid, one
  all-reduce of ``K`` partial sums gives the global distances and the argmin. Memory: ``2 x G x K x |latent|``
  divided by *all* devices (``R`` times less per device than 'replica'), at the price of one shared error
  population (diversity across replicas is shared, not kept separate) and ``B`` inserts per step into one bank.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from svi_jax import sharding
from svi_jax.erft.banks import Bank, grid_of, insert_many
from svi_jax.erft.banks import init_banks as init_banks_one
from svi_jax.erft.inject import _get, errors_from_prediction
from svi_jax.erft.inject import curate as curate_one
from svi_jax.erft.inject import inject as inject_one

BANK_MODES = ("replica", "global")


def bank_mode(config) -> str:
    mode = config.erft.get("bank_mode", "replica")
    if mode not in BANK_MODES:
        raise ValueError(f"config.erft.bank_mode must be one of {BANK_MODES}, got {mode!r}")
    return mode


def num_bank_replicas(config, num_devices: Optional[int] = None) -> int:
    """``R``: 1 in 'global' mode; in 'replica' mode ``erft.bank_replicas`` or (0) the mesh's ``data`` size."""
    if bank_mode(config) == "global":
        return 1
    r = int(config.erft.get("bank_replicas", 0))
    if r > 0:
        return r
    n = jax.device_count() if num_devices is None else num_devices
    return sharding.mesh_shape(dict(config.mesh), n)["data"]


def init_banks(config, latent_shape, num_devices: Optional[int] = None, dtype=None):
    """Empty banks. ``R > 1`` replicas are stacked replica-major along the grid axis: ``errors [R*G, K, *latent]``,
    ``count [R*G]`` (each device then holds whole ``[G, K, ...]`` banks of its replicas, no extra axis to squeeze)."""
    R = num_bank_replicas(config, num_devices)
    banks = init_banks_one(latent_shape, config.erft.num_grids, config.erft.capacity, dtype)
    if R == 1:
        return banks
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (R,) + x.shape).reshape((R * x.shape[0],) + x.shape[1:]),
                        banks)


def bank_specs(banks, mesh, num_grids: Optional[int] = None, latent_ndim: int = 4):
    """Specs of ``{'noise': Bank, 'latent': Bank}``: per-replica banks (``R x num_grids`` rows, replica-major) are
    split by replica over ``data`` and each entry over the replica's other devices; one global bank (``num_grids``
    rows, or ``num_grids`` not given) has its entries split over all devices."""
    def one(bank):
        rows = bank.errors.shape[0]
        R = rows // num_grids if num_grids else 1
        errors, lead = sharding.replicated_entries_spec(bank.errors.shape, mesh, R, latent_ndim)
        return Bank(errors, lead, None if bank.scale is None else P(*lead, None))

    return {k: one(b) for k, b in banks.items()}


def _replicas(banks, cfg) -> int:
    """``R`` if the banks hold ``R > 1`` replicas (``R * num_grids`` rows), else 0."""
    G = int(_get(cfg, "num_grids"))
    rows = banks["noise"].errors.shape[0]
    if rows % G:
        raise ValueError(f"the banks have {rows} grid rows, not a multiple of num_grids={G}")
    return rows // G if rows > G else 0


def _unstack(banks, R):
    return jax.tree.map(lambda a: a.reshape((R, a.shape[0] // R) + a.shape[1:]), banks)


def _stack(banks):
    return jax.tree.map(lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]), banks)


def _replica_mesh(R: int):
    """The context mesh if its ``data`` axis holds exactly the ``R`` bank replicas (shard_map path), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or R < 2:
        return None
    return mesh if sharding.axis_sizes(mesh).get("data", 1) == R else None


def _split(x, R):
    return None if x is None else x.reshape((R, x.shape[0] // R) + x.shape[1:])


def _merge(x):
    return None if x is None else x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def inject(key, banks, x0, y, eps, t, sigma, cfg):
    """``erft.inject`` for either bank layout (see the module docstring); same signature and outputs."""
    R = _replicas(banks, cfg)
    if not R:
        return inject_one(key, banks, x0, y, eps, t, sigma, cfg)
    B = x0.shape[0]
    if B % R:
        raise ValueError(f"the batch ({B}) must be a multiple of the number of bank replicas ({R})")
    keys = jax.random.split(key, R)
    mesh = _replica_mesh(R)
    if mesh is not None:
        d = P("data")

        def body(keys, banks, x0, y, eps, t, sigma):  # this replica's [G, K, ...] banks
            return inject_one(keys[0], banks, x0, y, eps, t, sigma, cfg)

        y_spec = None if y is None else d
        fn = jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, y_spec, d, d, d),
                           out_specs=(d, d, y_spec, d), axis_names={"data"}, check_vma=False)
        return fn(keys, banks, x0, y, eps, t, sigma)

    def one(k, b, x0, y, eps, t, sigma):
        return inject_one(k, b, x0, y, eps, t, sigma, cfg)

    x_t, target, y_new, info = jax.vmap(one)(keys, _unstack(banks, R), _split(x0, R), _split(y, R), _split(eps, R),
                                             _split(t, R), _split(sigma, R))
    return _merge(x_t), _merge(target), _merge(y_new), jax.tree.map(_merge, info)


def curate(key, banks, t, sigma, v_pred, target, info, step, cfg):
    """``erft.curate`` for either bank layout: per replica (its own errors; all replicas' during warm-up), or
    every error of the batch into the one global bank."""
    R = _replicas(banks, cfg)
    if not R:
        return curate_one(key, banks, t, sigma, v_pred, target, info, step, cfg)
    keys = jax.random.split(key, R)
    mesh = _replica_mesh(R)
    info = {"clean": info["clean"]}
    if mesh is not None:
        d = P("data")

        def body(keys, banks, t, sigma, v_pred, target, info, step):  # this replica's [G, K, ...] banks
            return _curate_gathered(keys[0], banks, t, sigma, v_pred, target, info["clean"], step, cfg, "data", R)

        fn = jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, d, d, d, d, P()), out_specs=d,
                           axis_names={"data"}, check_vma=False)
        return fn(keys, banks, t, sigma, v_pred, target, info, step)

    def one(k, b, t, sigma, v_pred, target, info):
        return curate_one(k, b, t, sigma, v_pred, target, info, step, cfg, axis_name="bank_replica")

    sp = lambda x: _split(x, R)  # noqa: E731
    return _stack(jax.vmap(one, axis_name="bank_replica")(keys, _unstack(banks, R), sp(t), sp(sigma), sp(v_pred),
                                                          sp(target), jax.tree.map(sp, info)))


def _curate_gathered(key, banks, t, sigma, v_pred, target, clean, step, cfg, axis: str, R: int):
    """``erft.curate(..., axis_name=axis)`` for one replica inside ``shard_map``, as a single insert loop.

    ``erft.curate`` switches between warm-up (insert everyone's errors) and local (own errors) with a
    ``lax.cond`` whose two branches both update the banks; XLA then copies both banks (2 x 105 GB at full size).
    Here the errors are always all-gathered and the warm-up switch only changes which of them are ``valid``
    (after warm-up: this replica's own, in the same order), so the banks are updated in place. Same results
    (checked against ``erft.curate`` under ``vmap`` in tests/test_sharding.py).
    """
    B = v_pred.shape[0]
    e_n, e_x = errors_from_prediction(v_pred, target, sigma)
    grid = grid_of(t, int(_get(cfg, "num_grids")), float(_get(cfg, "shift")), int(_get(cfg, "grid_offset")),
                        int(_get(cfg, "grid_steps")))
    gate = ~(jnp.asarray(clean) > 0.5) | (jax.random.uniform(key, (B,)) < _get(cfg, "p_insert_clean"))
    mode = _get(cfg, "warmup_gate")
    if mode not in ("receiver", "source"):
        raise ValueError(f"warmup_gate must be 'receiver' or 'source', got {mode!r}")

    mesh = jax.sharding.get_abstract_mesh()
    entry = sharding.entry_spec(v_pred.shape[1:], [a for a in sharding.MESH_AXES if a != axis],
                                 sharding.axis_sizes(mesh))

    def gather(x, dtype=None):
        x = x if dtype is None else x.astype(dtype)
        g = jax.lax.all_gather(x, axis)  # [R, B, ...], replica order
        g = g.reshape((-1,) + g.shape[2:])
        if g.ndim == 1 + len(entry):
            # split each error like the bank entries, so the nearest-entry distances stay local (otherwise GSPMD
            # may gather a whole grid's K entries, 4 GB in f32 at 81x480x832)
            g = jax.lax.with_sharding_constraint(g, P(None, *entry))
        return g

    wire = lambda b: b.errors.dtype if jnp.issubdtype(b.errors.dtype, jnp.floating) else jnp.float32  # noqa: E731
    grids = gather(grid)
    received = jnp.tile(gate, R)
    warm_valid = gather(gate) if mode == "source" else received
    own = (jnp.arange(R * B) // B) == jax.lax.axis_index(axis)
    warm = jnp.asarray(step) < _get(cfg, "warmup_steps")
    valid = jnp.where(warm, warm_valid, own & received)
    return {"noise": insert_many(banks["noise"], grids, gather(e_n, wire(banks["noise"])), valid),
            "latent": insert_many(banks["latent"], grids, gather(e_x, wire(banks["latent"])), valid)}
