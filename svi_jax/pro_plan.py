"""Ahead-of-time memory plan of the SVI 2.0 Pro sampler (both Wan2.2 experts resident, one compiled loop).

  python -m svi_jax.pro_plan --config configs/pro.py --devices 8 --mesh fsdp=8 --target tpu --chip v5p \\
      [--num_steps 50] [--json out.json]

Compiles :func:`svi_jax.denoise_experts.make_expert_sampler` (the whole 50-step loop with the ``lax.cond`` between
the experts, CFG as one batch-2 forward) for one clip of ``config.data`` size, the two experts' params split by the
rules table of :mod:`svi_jax.sharding` (as one DiT's: FSDP over ``fsdp``), from ``jax.ShapeDtypeStruct``s (nothing
allocated), for fake CPU devices or a TPU topology (``svi_jax.plan``'s targets), and reports per device the
compiler's memory analysis: arguments (params of both experts + inputs), temporaries, peak.
"""
from __future__ import annotations

import json
import sys
import time

GB = 1e9


def build(config, devices, sizes: dict, num_steps: int):
    import jax
    import jax.numpy as jnp

    from svi_jax import sharding
    from svi_jax.models.dit import DiTConfig, logical_specs, param_shapes
    from svi_jax.denoise_experts import make_expert_sampler
    from svi_jax.train.config import latent_shape

    cfg = DiTConfig.from_dict(dict(config.model.to_dict(), remat_policy="none"))
    mesh = sharding.make_mesh(sizes, devices)
    shapes = param_shapes(cfg)
    pspecs = sharding.dit_specs(logical_specs(cfg), shapes, mesh)
    F, h, w, C = latent_shape(config)
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    noise = S((1, F, h, w, C), f32)
    ctx = S((1, cfg.text_len, cfg.text_dim), f32)
    y = S((1, F, h, w, cfg.in_dim - cfg.out_dim), f32)
    fn = make_expert_sampler(cfg, num_steps, float(config.erft.shift), float(config.get("sample", {}).get(
        "cfg_scale", 5.0)), boundary=float(config.pro.boundary), t_dtype="bfloat16", cfg_batch=True, jit=False)
    rep = lambda a: sharding.to_shardings(sharding.fit_spec(sharding.P(), a.shape, mesh), mesh)  # noqa: E731
    p_sh = sharding.to_shardings(pspecs, mesh)
    in_sh = ({"high": p_sh, "low": p_sh}, rep(noise), rep(ctx), rep(ctx), rep(y))
    mj = sharding.MeshJit(fn, mesh, in_sh, rep(noise))
    experts = {"high": shapes, "low": shapes}
    return mj, (experts, noise, ctx, ctx, y), cfg, (F, h, w, C)


def plan(args) -> dict:
    from svi_jax import plan as P
    from svi_jax import plan_common as T

    config = P.load_config(args.config, args.set or [])
    sizes = T.parse_mesh(args.mesh) if args.mesh else {"fsdp": args.devices}
    if args.target == "tpu":
        devices = T.tpu_devices(args.topology or T.default_topology(args.chip, args.devices))
    else:
        import jax

        devices = jax.devices()[: args.devices]
    mj, example, cfg, latent = build(config, devices, sizes, args.num_steps)
    t0 = time.perf_counter()
    compiled = mj.lower(*example).compile()
    mem = T.memory(compiled)
    param_bytes = 2 * sum(a.size * a.dtype.itemsize for a in __import__("jax").tree.leaves(example[0]["high"]))
    return {"config": args.config, "target": args.target, "devices": args.devices, "mesh": sizes, "chip": args.chip,
            "chip_hbm_gb": T.CHIPS[args.chip]["hbm_gb"], "latent": list(latent), "num_steps": args.num_steps,
            "params_both_experts_gb_total": param_bytes / GB, "memory_per_device_gb": mem,
            "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    from svi_jax import cli
    from svi_jax import plan_common as T

    p = cli.ArgumentParser(prog="python -m svi_jax.pro_plan", description=__doc__.split("\n\n")[0],
                           config_overrides=True, overrides_dest="set", override_aliases=("--set",))
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--mesh", default="")
    p.add_argument("--chip", default="v5p", choices=sorted(T.CHIPS))
    p.add_argument("--target", default="cpu", choices=("cpu", "tpu"))
    p.add_argument("--topology", default="")
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.target == "cpu":
        import os

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    r = plan(args)
    m = r["memory_per_device_gb"]
    print(f"Pro sampler on {r['devices']} x {r['chip']} ({r['target']}), mesh {r['mesh']}, latent {r['latent']}, "
          f"{r['num_steps']} steps: both experts {r['params_both_experts_gb_total']:.1f} GB in total; per device "
          f"arguments {m['arguments']:.2f} GB, temporaries {m['temporaries']:.2f} GB, peak {m['peak']:.2f} GB of "
          f"{r['chip_hbm_gb']:.0f} GB  [compile {r['compile_s']} s]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
