"""Sampling cost: (1) a merged LoRA vs the base model (the paper's "no extra inference cost"), (2) classifier-free
guidance with the conditional and unconditional passes batched in one forward vs two forwards.

    python bench/sample_bench.py            # mid-size I2V DiT: Wan-1.3B width (1536, 12 heads, ffn 8960), 2 layers,
                                            # latent 5x30x52 (1,950 video tokens) + 512 text + 257 CLIP tokens, fp32
    python bench/sample_bench.py --quick    # tiny sizes, seconds

Each variant is the jitted whole-loop sampler of ``svi_jax.denoise.make_sampler`` (Euler, shift 5, CFG 5), timed
per call of ``steps`` denoising steps after a warm-up, variants round-robin (``bench.interleaved``) so machine load
hits all alike; reported per step. Variants: ``base`` (random base weights), ``merged`` (the same shapes with a
rank-r LoRA merged in: ``W += B @ A``), ``unmerged`` (the LoRA applied on the fly as ``x W + (x A) B``, what not
merging would cost), ``two_pass`` (base weights, CFG as two forwards per step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import interleaved, row  # noqa: E402

MID = dict(dim=1536, heads=12, ffn=8960, layers=2, text_dim=4096, text_len=512, image_dim=1280, latent=(5, 30, 52),
           rank=128, steps=2, reps=7)
QUICK = dict(dim=64, heads=2, ffn=128, layers=2, text_dim=32, text_len=16, image_dim=32, latent=(2, 4, 6), rank=8,
             steps=50, reps=7)


def run(quick: bool, reps: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from svi_jax import lora as lora_lib
    from svi_jax.model_dirs import flatten, unflatten
    from svi_jax.models.dit import DiTConfig, init_params
    from svi_jax.denoise import make_sampler

    c = dict(QUICK if quick else MID)
    reps = reps or c["reps"]
    cfg = DiTConfig(model_type="i2v", dim=c["dim"], num_layers=c["layers"], num_heads=c["heads"], ffn_dim=c["ffn"],
                    freq_dim=256 if not quick else 32, text_dim=c["text_dim"], text_len=c["text_len"], in_dim=36,
                    out_dim=16, image_dim=c["image_dim"], remat_policy="none")
    t0 = time.time()
    keys = jax.random.split(jax.random.key(0), 8)
    params = jax.jit(lambda k: init_params(cfg, k))(keys[0])
    lora = flatten(lora_lib.init_lora(params, keys[1], rank=c["rank"]))       # B is zero at init: randomise it
    lora = unflatten({k: 0.01 * jax.random.normal(jax.random.fold_in(keys[2], i), v.shape, v.dtype)
                      if k.endswith("/b") else v for i, (k, v) in enumerate(sorted(lora.items()))})
    merged = jax.jit(lambda p, l: lora_lib.merge(p, l, 1.0))(params, lora)
    f, h, w = c["latent"]
    noise = jax.random.normal(keys[3], (1, f, h, w, 16))
    ctx = jax.random.normal(keys[4], (1, c["text_len"], c["text_dim"]))
    neg = jax.random.normal(keys[5], (1, c["text_len"], c["text_dim"]))
    clip = jax.random.normal(keys[6], (1, 257, c["image_dim"]))
    y = jax.random.normal(keys[7], (1, f, h, w, 20))
    steps = c["steps"]
    batched = make_sampler(cfg, steps, 5.0, cfg_scale=5.0, cfg_batch=True)
    two = make_sampler(cfg, steps, 5.0, cfg_scale=5.0, cfg_batch=False)
    setup_s = time.time() - t0

    fns = {
        "base": lambda: batched(params, noise, ctx, neg, clip, y).block_until_ready(),
        "merged": lambda: batched(merged, noise, ctx, neg, clip, y).block_until_ready(),
        "unmerged": lambda: batched(params, noise, ctx, neg, clip, y, lora=lora).block_until_ready(),
        "two_pass": lambda: two(params, noise, ctx, neg, clip, y).block_until_ready(),
    }
    t1 = time.time()
    for fn in fns.values():                       # compile (and check the outputs agree)
        fn()
    compile_s = time.time() - t1
    outs = {k: batched(p, noise, ctx, neg, clip, y) for k, p in (("base", params), ("merged", merged))}
    out_unmerged = batched(params, noise, ctx, neg, clip, y, lora=lora)
    out_two = two(params, noise, ctx, neg, clip, y)
    agree = {"merged_vs_unmerged_max_abs": float(jnp.max(jnp.abs(outs["merged"] - out_unmerged))),
             "batched_vs_two_pass_max_abs": float(jnp.max(jnp.abs(outs["base"] - out_two))),
             "merged_vs_base_max_abs": float(jnp.max(jnp.abs(outs["merged"] - outs["base"])))}
    timing = interleaved(fns, reps=reps, warmup=1)
    per_step = {k: timing[k]["median"] / steps for k in fns}
    tokens = f * (h // 2) * (w // 2)
    return {
        "quick": quick,
        "config": {"dim": c["dim"], "heads": c["heads"], "ffn": c["ffn"], "layers": c["layers"],
                   "latent": list(c["latent"]), "video_tokens": tokens, "text_tokens": c["text_len"],
                   "clip_tokens": 257, "lora_rank": c["rank"], "steps_per_call": steps, "cfg_scale": 5.0,
                   "dtype": "float32", "reps": reps},
        "jax_backend": jax.default_backend(),
        "setup_s": round(setup_s, 1), "compile_s": round(compile_s, 1),
        "agreement": agree,
        "s_per_step": per_step,
        "merged_over_base": per_step["merged"] / per_step["base"],
        "merged_over_base_paired": timing["_pairs"]["merged"],
        "unmerged_over_base": per_step["unmerged"] / per_step["base"],
        "batched_over_two_pass": per_step["base"] / per_step["two_pass"],
        "batched_over_two_pass_paired": 1.0 / timing["_pairs"]["two_pass"],
        "timing": timing,
    }


def _fmt(s: float) -> str:
    return f"{s:.3f} s/step" if s >= 0.1 else f"{s * 1e3:.3f} ms/step"


def rows(res: dict) -> list[dict]:
    """Rows: merged LoRA / base step time (goal <= 1.01) and batched / two-pass CFG step time (the goal: the
    sampler's default on this backend is the faster of the two)."""
    c, ps = res["config"], res["s_per_step"]
    size = (f"dim {c['dim']}, {c['layers']} layers, {c['video_tokens']}+{c['text_tokens']}+{c['clip_tokens']} "
            f"tokens, CFG 5, fp32")
    r1 = res["merged_over_base"]
    r2 = res["batched_over_two_pass"]
    batched_default = res["jax_backend"] != "cpu"      # sampler.resolve_cfg_batch(None)
    return [
        row(f"sampling step, LoRA r{c['lora_rank']} merged ({size})", _fmt(ps["merged"]),
            f"base {_fmt(ps['base'])}", r1, "<= 1.01", r1 <= 1.01,
            f"same compiled function and shapes; paired-round ratio {res['merged_over_base_paired']:.3f}; "
            f"unmerged LoRA would cost {res['unmerged_over_base']:.2f}x"),
        row(f"sampling step, CFG batched cond+uncond ({size})", _fmt(ps["base"]),
            f"two passes {_fmt(ps['two_pass'])}", r2, "default is the faster", (r2 > 1.0) == (not batched_default),
            f"paired-round ratio {res['batched_over_two_pass_paired']:.3f}; outputs agree to "
            f"{res['agreement']['batched_vs_two_pass_max_abs']:.1e}; the sampler's default on this backend "
            f"({res['jax_backend']}): {'batched' if batched_default else 'two passes'} (sampler.resolve_cfg_batch)"),
    ]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes")
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    res = run(a.quick, a.reps)
    print(json.dumps({k: v for k, v in res.items() if k != "timing"}, indent=2))
    print(json.dumps(rows(res), indent=2, ensure_ascii=False))
