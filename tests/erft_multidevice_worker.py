"""Run by tests/test_erft_multidevice.py in its own process with 4 fake CPU devices.

Each of 4 data-parallel replicas (``jax.shard_map`` over axis 'data') holds its own banks and curates a batch
of 2. Checks, against a list-based reference of the expected insert sequence:
* step < warmup_steps: every replica inserts the all-gathered errors of every replica, in replica order,
  gated by its own clean flags ('receiver', the official behaviour) or by each error's source ('source');
* step >= warmup_steps: every replica inserts only its own errors.
Prints OK on success; any failure raises.
"""
import os
import sys

assert "xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", ""), "run via the test"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from svi_jax import erft, flow  # noqa: E402

R, B, G, K = 4, 2, 50, 3
SHAPE = (2, 2, 2, 4)
assert jax.device_count() == R, jax.devices()
mesh = jax.make_mesh((R,), ("data",))
GRID_T = flow.timesteps(G, 5.0)


def make_step(cfg):
    def body(key, banks, t, sigma, v_pred, target, clean, step):
        banks = jax.tree.map(lambda x: x[0], banks)  # this replica's banks
        key = jax.random.fold_in(key[0], jax.lax.axis_index("data"))
        out = erft.curate(key, banks, t, sigma, v_pred, target, {"clean": clean}, step, cfg, axis_name="data")
        return jax.tree.map(lambda x: x[None], out)

    d = P("data")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, d, d, d, d, P()), out_specs=d),
                donate_argnums=1)
    sharded = jax.sharding.NamedSharding(mesh, d)

    def run(*args):
        *per_replica, step = args
        return f(*jax.device_put(per_replica, sharded), step)

    return run


def expected(own_errors, grids, keep):
    """keep[r][i]: does replica r insert flat error i (of R*B, replica-major)? -> per-replica lists per grid."""
    out = []
    for r in range(R):
        lists = [[] for _ in range(G)]
        for i in range(R * B):
            if keep[r][i]:
                entries = lists[grids[i]]
                if len(entries) < K:
                    entries.append(own_errors[i])
                else:
                    d = [np.sum((x - own_errors[i]) ** 2) for x in entries]
                    entries[int(np.argmin(d))] = own_errors[i]
        out.append(lists)
    return out


def check(banks, name, want, what):
    bank = banks[name]
    errors, count = np.asarray(bank.errors), np.asarray(bank.count)
    for r in range(R):
        for g in range(G):
            assert count[r, g] == len(want[r][g]), (what, name, r, g, count[r, g], len(want[r][g]))
            if want[r][g]:
                np.testing.assert_allclose(errors[r, g, : count[r, g]], np.stack(want[r][g]), rtol=1e-6,
                                           err_msg=f"{what}: {name} bank, replica {r}, grid {g}")


def main():
    rng = np.random.default_rng(0)
    # Examples 0..7 (replica-major); grids collide across replicas so insert order matters, and grid 5
    # receives more than K errors during warm-up so the nearest-L2 replacement runs too.
    gi = np.array([5, 9, 5, 20, 5, 9, 5, 5])
    t = GRID_T[gi].astype(np.float32)
    sigma = (t / 1000).astype(np.float32)
    v_pred = rng.normal(size=(R * B,) + SHAPE).astype(np.float32)
    target = rng.normal(size=(R * B,) + SHAPE).astype(np.float32)
    clean = np.array([0, 1, 0, 0, 1, 0, 0, 1], np.float32)
    d = v_pred - target
    s = sigma[:, None, None, None, None]
    e_n, e_x = (1 - s) * d, -s * d
    keys = jax.random.split(jax.random.key(0), R)

    def fresh():
        banks = erft.init_banks(SHAPE, num_grids=G, capacity=K, dtype=jnp.float32)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (R,) + x.shape), banks)

    args = (t, sigma, v_pred, target, clean)
    not_clean = clean < 0.5
    for mode in ("receiver", "source"):
        cfg = erft.erft_config(p_insert_clean=0.0, warmup_steps=50, warmup_gate=mode)
        step = make_step(cfg)
        # warm-up (step 49 is the last warm-up step: official iteration_count 50 <= 50)
        out = step(keys, fresh(), *args, jnp.int32(49))
        if mode == "receiver":
            keep = [[not_clean[r * B + i % B] for i in range(R * B)] for r in range(R)]
        else:
            keep = [[not_clean[i] for i in range(R * B)] for r in range(R)]
        check(out, "noise", expected(e_n, gi, keep), f"warm-up/{mode}")
        check(out, "latent", expected(e_x, gi, keep), f"warm-up/{mode}")
        if mode == "source":
            for leaf in jax.tree.leaves(out):  # replicas identical during warm-up
                leaf = np.asarray(leaf)
                assert all(np.array_equal(leaf[0], leaf[r]) for r in range(R))

        # after warm-up: own errors only
        out = step(keys, fresh(), *args, jnp.int32(50))
        keep = [[(i // B == r) and not_clean[i] for i in range(R * B)] for r in range(R)]
        check(out, "noise", expected(e_n, gi, keep), f"local/{mode}")
        check(out, "latent", expected(e_x, gi, keep), f"local/{mode}")

    # bf16 banks gather in bf16 (exact, since the bank rounds to bf16 anyway): same result as local inserts
    cfg = erft.erft_config(p_insert_clean=1.0)
    step = make_step(cfg)
    banks = jax.tree.map(lambda x: jnp.broadcast_to(x, (R,) + x.shape),
                         erft.init_banks(SHAPE, num_grids=G, capacity=K))
    out = step(keys, banks, *args, jnp.int32(0))
    keep = [[True] * (R * B) for _ in range(R)]
    want = expected(np.asarray(jnp.asarray(e_n).astype(jnp.bfloat16).astype(jnp.float32)), gi, keep)
    out = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, out)
    check(out, "noise", want, "warm-up/bf16")
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
