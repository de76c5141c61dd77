"""Ahead-of-time memory plan of the sampler users run: ``python -m svi_jax.plan --sample``.

  python -m svi_jax.plan --sample --config configs/shot.py --devices 8 --target tpu --chip v5p [--mesh ...] \\
      [--num_steps 50] [--json out.json]

Builds the very program ``python -m svi_jax.sample`` builds on a mesh (:mod:`svi_jax.sample_mesh`: the default mesh
for the devices -- CFG's two branches over ``data``, the tokens over ``context`` -- or ``--mesh``; the attention
``auto`` resolves to for that target; :func:`svi_jax.denoise.make_sampler`'s whole ``num_steps`` loop with batched
CFG; DiT params split by the rules table) from ``jax.ShapeDtypeStruct``s (nothing allocated), compiles it for fake
CPU devices or a TPU topology, and reports the compiler's memory analysis per device. The frozen VAE / UMT5 / CLIP
run once per clip on one device and are not part of this program.
"""
from __future__ import annotations

import time

import numpy as np

GB = 1e9


def build(config, devices, mesh_spec, num_steps: int, cfg_scale: float, solver: str = "euler"):
    """``(MeshSampler, abstract args, dit_config, latent shape)`` of one clip's denoising loop."""
    import jax
    import jax.numpy as jnp

    from svi_jax import sample_mesh
    from svi_jax.models.dit import DiTConfig, param_shapes
    from svi_jax.denoise import make_sampler
    from svi_jax.train.config import latent_shape

    cfg = DiTConfig.from_dict(dict(config.model.to_dict(), remat_policy="none"))   # as LongVideoSampler
    mesh, cfg, cfg_batch = sample_mesh.setup(mesh_spec, cfg, cfg_scale, None, devices=devices)
    if mesh is None:
        raise ValueError("--sample plans a mesh of several devices; for one device use --devices 2 or more, or "
                         "--mesh with an axis > 1")
    fn = make_sampler(cfg, int(num_steps), float(config.erft.shift), float(cfg_scale), solver,
                      cfg_batch=cfg_batch, jit=False)
    shapes = param_shapes(cfg)
    from svi_jax.config_schema import logical_rules

    ms = sample_mesh.MeshSampler(fn, mesh, cfg, shapes, logical_rules(config))
    F, h, w, C = latent_shape(config)
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    ctx = S((1, cfg.text_len, cfg.text_dim), f32)
    clip = S((1, _clip_tokens(config), cfg.image_dim), f32) if cfg.uses_clip else None
    y = S((1, F, h, w, cfg.in_dim - cfg.out_dim), f32) if cfg.is_i2v else None
    args = (shapes, S((1, F, h, w, C), f32), ctx, ctx, clip, y, None, None, None)   # lora, extra, neg_extra
    return ms, args, cfg, (F, h, w, C)


def _clip_tokens(config) -> int:
    """CLIP tokens per image of the config's image encoder (257 for Wan's ViT-H/14 at 224)."""
    from svi_jax.models.clip import CLIPConfig

    return CLIPConfig.from_dict(config.encoders.clip.to_dict()).num_tokens


def plan(args, config, devices) -> dict:
    import jax

    from svi_jax import plan_common as T
    from svi_jax import sample_mesh

    cfg_scale = float(config.get("sample", {}).get("cfg_scale", 5.0))
    mesh_spec = T.parse_mesh(args.mesh) if args.mesh else None
    ms, example, cfg, latent = build(config, devices, mesh_spec, args.num_steps, cfg_scale)
    sizes = {k: int(v) for k, v in ms.mesh.shape.items()}
    t0 = time.perf_counter()
    compiled = ms._build(example).lower(*example).compile()       # abstract args: nothing to place
    params = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(example[0]))
    mem = T.memory(compiled)
    return {"mode": "sample", "config": args.config, "overrides": list(args.set), "target": args.target,
            "topology": args.topology or (T.default_topology(args.chip, args.devices) if args.target == "tpu" else ""),
            "devices": args.devices, "mesh": sizes, "chip": args.chip, "chip_hbm_gb": T.CHIPS[args.chip]["hbm_gb"],
            "latent": list(latent), "tokens_per_clip": int(np.prod(np.asarray(latent[:3]) // np.asarray(cfg.patch_size))),
            "num_steps": args.num_steps, "cfg_scale": cfg_scale,
            "model": {"dim": cfg.dim, "num_layers": cfg.num_layers, "param_dtype": cfg.param_dtype,
                      "attention": sample_mesh.resolved_attention(cfg, ms.mesh)},
            "params_gb_total": params / GB, "memory_per_device_gb": mem,
            "fits": mem["peak"] <= T.CHIPS[args.chip]["hbm_gb"],
            "compile_s": round(time.perf_counter() - t0, 1), "jax": jax.__version__, "label": args.label}


def run(args, config) -> dict:
    """``python -m svi_jax.plan --sample``: the sampler's plan of ``config`` (loaded by the command) on the target's
    devices."""
    import jax

    from svi_jax import plan_common as T

    if args.attention:
        config.model.attention = args.attention
    devices = (T.tpu_devices(args.topology or T.default_topology(args.chip, args.devices)) if args.target == "tpu"
               else jax.devices()[: args.devices])
    r = plan(args, config, devices)
    r["attention_override"] = args.attention or None
    return r


def format_report(r: dict) -> str:
    m = r["memory_per_device_gb"]
    return (f"sampler plan: {r['config']} on {r['devices']} devices ({r['target']} {r['topology']}), mesh "
            f"{ {k: v for k, v in r['mesh'].items() if v > 1} }, chip {r['chip']} ({r['chip_hbm_gb']:.0f} GB)\n"
            f"  latent {r['latent']}, {r['tokens_per_clip']} tokens/clip, {r['num_steps']} steps, CFG "
            f"{r['cfg_scale']:g} (batched), attention {r['model']['attention']}, params {r['params_gb_total']:.1f} GB "
            f"({r['model']['param_dtype']})\n"
            f"  per device (GB): arguments {m['arguments']:.2f}  temporaries {m['temporaries']:.2f}  -> peak "
            f"{m['peak']:.2f} ({'fits' if r['fits'] else 'DOES NOT FIT'})\n"
            f"  compile {r['compile_s']} s")
