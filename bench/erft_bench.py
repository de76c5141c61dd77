#!/usr/bin/env python
"""Cost of the ERFT error banks: one ``insert`` + ``draw`` at capacity K vs a small dense forward.

    python bench/erft_bench.py            # real-size latent [21, 60, 104, 16], K = 500 (≈2.1 GB bf16 per grid)
    python bench/erft_bench.py --quick    # tiny sizes, seconds

Only one or two grids are allocated: the cost of an insert or a sample touches one grid (append: one entry;
full grid: a distance scan over that grid's K entries), so it does not depend on the number of grids. Bank
bytes per device at G = 50 are computed (``bank_nbytes``), not allocated — they do not fit in RAM here.

The "small dense forward" is a stand-in with the same tokens as the latent (patch 1x2x2 -> 64 features per
token, embed to ``width``, two pre-LN MLP blocks of 4x width, project back): it calibrates what a cheap
model-sized pass over the same data costs on this machine. Times are medians after warm-up, CPU, noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)

from bench import median_time, rss_mb  # noqa: E402

REAL_SHAPE = (21, 60, 104, 16)


def _dense_forward_time(shape, width, reps):
    import jax
    import jax.numpy as jnp
    import numpy as np

    F, H, W, C = shape
    tokens, feat = F * (H // 2) * (W // 2), 4 * C
    rng = np.random.default_rng(0)

    def w(a, b):
        return jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)

    params = dict(w_in=w(feat, width), w_out=w(width, feat),
                  blocks=[(w(width, 4 * width), w(4 * width, width)) for _ in range(2)])

    @jax.jit
    def forward(p, x):
        h = x.reshape(F, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 2, 4, 5).reshape(tokens, feat) @ p["w_in"]
        for a, b in p["blocks"]:
            n = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)
            h = h + jax.nn.gelu(n @ a) @ b
        return (h @ p["w_out"]).reshape(F, H // 2, W // 2, 2, 2, C)

    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    forward(params, x).block_until_ready()
    t = median_time(lambda: forward(params, x).block_until_ready(), reps, warmup=0)["median"]
    flops = 2 * tokens * (feat * width * 2 + 2 * 2 * width * 4 * width)
    return dict(seconds=t, tokens=tokens, width=width, gflop=flops / 1e9)


def _bank_times(shape, capacity, dtype, reps):
    """Insert into a full grid, append into a non-full grid, sample one grid, sample pooled."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from svi_jax import erft
    from svi_jax.convert.common import peak_rss_mb

    rss0 = rss_mb()
    bank = erft.init_bank(2, capacity, shape, dtype)
    # grid 0 full (distance scan on insert), grid 1 with one entry (plain append; count reset every call)
    bank = bank._replace(count=jnp.array([capacity, 1], jnp.int32))
    if bank.scale is not None:
        bank = bank._replace(scale=jnp.full_like(bank.scale, 0.01))
    bank_mb = sum(x.nbytes for x in jax.tree.leaves(bank)) / 2**20
    e = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)

    ins = jax.jit(erft.insert, donate_argnums=0)
    smp = jax.jit(erft.draw)
    pooled = jax.jit(erft.draw_pooled)
    state = {"bank": bank}
    del bank

    def insert_full():
        state["bank"] = ins(state["bank"], 0, e)
        state["bank"].count.block_until_ready()

    def insert_append():
        b = state["bank"]
        state["bank"] = ins(b._replace(count=b.count.at[1].set(1)), 1, e)
        state["bank"].count.block_until_ready()

    key = jax.random.key(0)
    out = {}
    for name, fn in (("insert_full_s", insert_full), ("insert_append_s", insert_append),
                     ("sample_s", lambda: smp(state["bank"], key, 0)[0].block_until_ready()),
                     ("sample_pooled_s", lambda: pooled(state["bank"], key)[0].block_until_ready())):
        fn()  # compile
        out[name] = median_time(fn, reps, warmup=0)["median"]
    out["rss_over_bank_mb"] = rss_mb() - rss0 - bank_mb
    out["process_peak_rss_mb"] = peak_rss_mb()
    out["bank_mb_allocated"] = bank_mb
    assert int(state["bank"].count[0]) == capacity
    del state
    return out


def _storage_error(shape):
    """Relative L2 error of stored errors: int8 (per-entry absmax scale) and bf16, for three distributions."""
    import jax.numpy as jnp
    import numpy as np

    from svi_jax import erft

    rng = np.random.default_rng(2)
    dists = {"gaussian": rng.normal(size=shape), "laplace": rng.laplace(size=shape),
             "student_t3": rng.standard_t(3, size=shape)}
    probe = {"int8": erft.init_bank(1, 1, shape, jnp.int8), "bf16": erft.init_bank(1, 1, shape)}
    out = {}
    for dname, e in dists.items():
        e = e.astype(np.float32)
        for mode, bank in probe.items():
            q, s = erft.encode(bank, e)
            back = np.asarray(erft.decode(q, s))
            out[f"{mode}_{dname}"] = float(np.linalg.norm(back - e) / np.linalg.norm(e))
    return out


def run(quick: bool) -> dict:
    import jax.numpy as jnp

    from svi_jax import erft

    shape = (3, 8, 12, 16) if quick else REAL_SHAPE
    capacity = 20 if quick else 500
    reps = 3 if quick else 5
    res = {"shape": list(shape), "capacity": capacity, "quick": quick}
    res["dense_forward"] = _dense_forward_time(shape, 64 if quick else 256, reps)
    for name, dtype in (("bf16", jnp.bfloat16), ("int8", jnp.int8)):
        res[name] = _bank_times(shape, capacity, dtype, reps)
        full = res[name]["insert_full_s"] + res[name]["sample_s"]
        res[name]["insert_full_plus_sample_over_dense_forward"] = full / res["dense_forward"]["seconds"]
    # bytes per device: two banks (noise + latent), G = 50 grids, real latent size, several capacities
    res["bank_gb_per_device_two_banks"] = {
        f"K{k}_{n}": 2 * erft.bank_nbytes(50, k, REAL_SHAPE, d) / 1e9
        for k in (500, 100, 50) for n, d in (("bf16", jnp.bfloat16), ("int8", jnp.int8))}
    res["storage_rel_error"] = _storage_error(shape)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(run(ap.parse_args().quick), indent=2))
