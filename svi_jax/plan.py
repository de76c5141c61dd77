"""Ahead-of-time plan of the ERFT train step on a (fake) device mesh, without allocating anything.

  python -m svi_jax.plan --config configs/shot.py --devices 64 --mesh data=8,fsdp=8 --chip v5p --json out.json

Builds the train state and the batch as ``jax.ShapeDtypeStruct``s, as the trainer reads them for the config
(``--inputs config``): with a latent cache (``data.cache``) the DiT step on cached latents
(``conditioners.LatentConditioner``); otherwise pixel batches, with the frozen VAE/UMT5/CLIP (their shapes from
``config.encoders`` or the checkpoints' ``config.json``, in ``config.encoders.dtype``) encoding them in their own
program before the DiT step, as the trainer runs them (``conditioners.PixelConditioner``, ``TrainStep.encode``):
both programs are compiled, the peak is the larger of the two (the encoders' beside the rest of the state; the DiT
step's beside the pixel batch the caller holds), and the FLOPs are their sum. It jits the real
train step as the trainer builds it (:func:`svi_jax.train.builder.build`, abstract), lowers and compiles it for

* ``--target cpu`` (default): ``--devices`` fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
  set here; the command re-executes itself if JAX was already initialised with another device count);
* ``--target tpu``: a TPU slice described by ``--topology`` (e.g. ``v5p:4x4x4``, 64 chips; default from ``--chip``
  and ``--devices``), compiled by the real TPU compiler on this host without a TPU
  (``jax.experimental.topologies``; needs the ``libtpu`` wheel matching jax, ``pip install 'libtpu==0.0.42.*'``
  for jax 0.10.2, or ``TPU_LIBRARY_PATH`` pointing at a ``libtpu.so``),

and reports per device:

* bytes of arguments / outputs / aliased (donated) / temporaries from ``compiled.memory_analysis()``, the peak
  estimate ``arguments + outputs - aliased + temporaries``, and the per-part split of the arguments (frozen
  params, LoRA, optimizer, banks, batch) from the shard shapes;
* FLOPs: the compiled per-device HLO, counted by walking every ``dot`` with its enclosing loops' trip counts
  (``compiled.cost_analysis()`` counts a ``while`` body once, so it is printed only for reference), against the
  analytic count of :func:`svi_jax.models.dit.flops_per_forward` (see ``analytic_flops``);
* bytes moved by collectives, compile time.

Caveat for ``--target cpu``: XLA:CPU keeps many bf16 intermediates in f32 (e.g. it rewrites the bf16 stack of
rematerialisation residuals as f32) and fuses less, so its temporaries are an upper bound; ``--target tpu`` gives
the TPU compiler's own buffer assignment.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from svi_jax import cli as _cli
from svi_jax.plan_common import (CHIPS, COLLECTIVES, GB, memory, default_topology,  # noqa: F401 (API)
                                 ensure_devices, hlo_stats, load_config, parse_mesh, tpu_devices)


# ------------------------------------------------------------------------------------------------ args


def build_parser() -> argparse.ArgumentParser:
    """The plan's flags; ``--config.a.b=value`` overrides (and the deprecated ``--set a.b=value``) are collected in
    ``args.set`` for :func:`load_config`."""
    p = _cli.ArgumentParser(prog="python -m svi_jax.plan", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, config_overrides=True,
                            overrides_dest="set", override_aliases=("--set",))
    p.add_argument("--config", required=True, help="training config file, e.g. configs/shot.py; override any field "
                   "with --config.a.b=value, e.g. --config.erft.capacity=250 --config.model.num_layers=2")
    p.add_argument("--devices", type=int, required=True, help="number of (fake) devices")
    p.add_argument("--mesh", default="", help="axis=size list, e.g. data=8,fsdp=8 (unset axes: 1, -1 = the rest; "
                   "default: the config's mesh)")
    p.add_argument("--chip", default="v5p", choices=sorted(CHIPS), help="HBM size and peak FLOP/s to compare with")
    p.add_argument("--target", default="cpu", choices=("cpu", "tpu"),
                   help="compile for fake CPU devices, or for a TPU topology with the TPU compiler (needs libtpu)")
    p.add_argument("--topology", default="", help="TPU topology for --target tpu, e.g. v5p:4x4x4 (default: from "
                   "--chip and --devices)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: one clip per data x fsdp slot)")
    p.add_argument("--attention", default="", help="override the config's attention implementation (default: "
                   "the config's, as the trainer builds it; 'auto' resolves to the target's fused kernel, splash on "
                   "TPU); the report records an override")
    p.add_argument("--remat_policies", default="", help="also compile the step with each of these remat policies "
                   "(comma list, or 'all' = full,save_attention,offload_attention) and report their memory")
    p.add_argument("--inputs", default="config", choices=INPUTS, help="what the step takes: 'config' = what the "
                   "trainer reads for this config (a latent cache with data.cache, else pixels encoded by the frozen "
                   "VAE/UMT5/CLIP in their own program before the DiT step, both compiled and counted), or force 'latents' / "
                   "'pixels'")
    p.add_argument("--json", default="", help="also write the report here")
    p.add_argument("--label", default="", help="a free-text label stored in the report")
    p.add_argument("--sample", action="store_true", help="plan the sampler instead of the train step: the program "
                   "python -m svi_jax.sample runs on this mesh (default mesh: CFG over data, tokens over context), "
                   "one clip's whole denoising loop (svi_jax/sample_plan.py)")
    p.add_argument("--num_steps", type=int, default=50, help="--sample: denoising steps of the compiled loop")
    return p


# ------------------------------------------------------------------------------------------------ analytic


def analytic_flops(dit_cfg, latent_fhw, batch: int, text_len: int, remat: bool, lora_rank: int,
                   lora_params: int) -> dict:
    """Matmul FLOPs of one train step, counted as follows (F = ``flops_per_forward``, A = its attention part):

    * forward F; with full rematerialisation the forward again inside the backward (F);
    * backward of a frozen base: only input gradients, one matmul per forward matmul (F - A) -- no weight
      gradients for frozen weights (the usual "3x forward" counts those as well);
    * attention backward with recomputed scores (flash): QK^T again, dP = dO V^T, dV = P^T dO, dQ, dK: 2.5 A;
    * LoRA: forward (x A) B, backward input grads and the A/B gradients: 3 x 2 x tokens x r x (in + out) summed
      over targets = 6 x tokens x lora_params per layer-stack.
    """
    from svi_jax.models.dit import flops_per_forward

    f, h, w = latent_fhw
    F = flops_per_forward(dit_cfg, (f, h, w), batch=batch, text_len=text_len)
    pt, ph, pw = dit_cfg.patch_size
    n = (f // pt) * (h // ph) * (w // pw)
    ctx = text_len + (257 if dit_cfg.uses_clip else 0)
    A = 2.0 * batch * dit_cfg.num_layers * (2 * n * n * dit_cfg.dim + 2 * n * ctx * dit_cfg.dim)
    lora = 6.0 * batch * n * lora_params  # approx.: every LoRA target sees the video tokens (cross k/v see text)
    step = F + (F if remat else 0.0) + (F - A) + 2.5 * A + lora
    return {"forward": F, "attention_forward": A, "lora": lora, "step": step, "three_x_forward": 3.0 * F}


# ------------------------------------------------------------------------------------------------ plan


INPUTS = ("config", "latents", "pixels")


def resolve_inputs(config, inputs: str = "config") -> str:
    """What the trainer's step takes for ``config``: 'latents' with a latent cache (``config.data.cache``), else
    'pixels' (video, condition frames, first frame and caption ids, encoded by the frozen encoders' program)."""
    if inputs not in INPUTS:
        raise ValueError(f"--inputs must be one of {INPUTS}, got {inputs!r}")
    if inputs != "config":
        return inputs
    return "latents" if config.data.get("cache", "") else "pixels"


def plan_conditioner(config, inputs: str):
    """The trainer's conditioner for ``inputs`` ('latents' or 'pixels'), with abstract frozen encoders (their
    shapes only, from ``config.encoders`` or the checkpoints' ``config.json``; nothing read or allocated)."""
    from svi_jax.conditioners import LatentConditioner, PixelConditioner
    from svi_jax.encoders import make_encoders

    if inputs == "latents":
        return LatentConditioner(config)
    if config.get("pro", None) is not None or config.model.get("multitalk", False):
        raise ValueError("--inputs pixels plans the Shot/Film/Dance step; Pro has `--config configs/pro_*.py` "
                         "(svi_jax/pro_plan.py) and Talk plans with --inputs latents")
    enc = make_encoders(config, abstract=True, dtype=config.encoders.get("dtype", "float32"))
    enc.check_widths(config.model.text_dim, config.model.out_dim)
    enc.check_image_width(config.model.image_dim)
    return PixelConditioner(config, enc)


def abstract_batch(config, conditioner, batch_size: int) -> dict:
    """The batch the trainer's ``device_batch`` makes, as ``ShapeDtypeStruct``s."""
    import jax
    import jax.numpy as jnp

    from svi_jax.conditioners import LatentConditioner
    from svi_jax.models.dit import DiTConfig
    from svi_jax.train.config import latent_shape

    S, f32, B = jax.ShapeDtypeStruct, jnp.float32, batch_size
    dit_cfg = DiTConfig.from_dict(config.model.to_dict())
    if isinstance(conditioner, LatentConditioner):
        F, H, W, C = latent_shape(config)
        batch = {"latents": S((B, F, H, W, C), f32), "context": S((B, dit_cfg.text_len, dit_cfg.text_dim), f32)}
        if dit_cfg.is_i2v:
            batch["y"] = S((B, F, H, W, C + 4), f32)
            batch["clip_fea"] = S((B, 257, dit_cfg.image_dim), f32)
        return batch
    d, L = config.data, conditioner.t5_cfg.text_len
    video = S((B, int(d.num_frames), int(d.height), int(d.width), 3), f32)
    batch = {"ids": S((B, L), jnp.int32), "ids_mask": S((B, L), jnp.int32), "video": video}
    if dit_cfg.is_i2v:
        batch.update(cond=video, first_frame=S((B, int(d.height), int(d.width), 3), f32))
    return batch


def build_step(config, devices, sizes: dict, batch_size: int, inputs: str = "latents"):
    """The trainer's own step, built as the trainer builds it (``svi_jax.train.builder.build``, abstract: nothing
    allocated) on a mesh of ``devices``, with the batch of ``inputs``: 'latents' (a latent cache,
    ``LatentConditioner``) or 'pixels' (the frozen VAE/UMT5/CLIP's program first, ``PixelConditioner``).
    Returns ``(step, state, batch, mesh)``; ``step.lower(state, batch)`` lowers it."""
    built, batch = _build(config, devices, sizes, batch_size, inputs)
    return built.step, built.state, batch, built.step.mesh


def _build(config, devices, sizes: dict, batch_size: int, inputs: str):
    """:func:`svi_jax.train.builder.build` (abstract) with the conditioner of ``inputs`` and its abstract batch,
    placed as the trainer's is (the same avals, so the same trace). Returns ``(built, batch)``."""
    from svi_jax import sharding
    from svi_jax.train.builder import build

    mesh = sharding.make_mesh(sizes, devices=devices)
    conditioner = plan_conditioner(config, resolve_inputs(config, inputs))
    built = build(config, mesh, abstract=True, conditioner=conditioner)
    batch = abstract_batch(config, conditioner, batch_size)
    built.step.build(built.state, batch)
    return built, sharding.abstract(batch, built.step.batch_shardings)


def encoder_report(built, batch, resident_bytes: int = 0) -> dict:
    """The frozen encoders' own program (``TrainStep.lower_encode``, run before the DiT step, as the trainer runs
    it): FLOPs, temporaries and peak per device. ``peak_with_state`` adds ``resident_bytes``, the rest of the train
    state that stays on the device while it runs (DiT params, LoRA, optimizer, banks)."""
    compiled = built.step.lower_encode(built.state, batch).compile()
    mem = memory(compiled)
    return {"flops_per_device": hlo_stats(compiled.as_text())["flops"], "temporaries": mem["temporaries"],
            "peak": mem["peak"], "arguments": mem["arguments"], "outputs": mem["outputs"],
            "peak_with_state": mem["peak"] + resident_bytes / GB}


def remat_report(config, devices, sizes, batch_size, policies, hbm_gb: float, inputs: str = "latents",
                 extra_gb: float = 0.0, floor_gb: float = 0.0) -> dict:
    """Per remat policy: the compiled step's memory per device (and whether it fits ``hbm_gb``) and compile time.
    With encoders, ``peak`` is the larger of the DiT step's plus ``extra_gb`` (the pixel batch the caller holds)
    and ``floor_gb`` (the encoders' program beside the state, which no remat policy changes)."""
    import copy

    out = {}
    for name in policies:
        c = copy.deepcopy(config)
        c.model.remat_policy = name
        t0 = time.time()
        step, state, batch, _ = build_step(c, devices, sizes, batch_size, inputs)
        try:
            compiled = step.lower(state, batch).compile()
        except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory is a result here
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            out[name] = {"fits": False, "error": str(e).strip().splitlines()[0][:300],
                         "compile_s": time.time() - t0}
            continue
        mem = memory(compiled)
        mem["peak"] = max(mem["peak"] + extra_gb, floor_gb)
        out[name] = dict(mem, fits=bool(mem["peak"] <= hbm_gb), compile_s=time.time() - t0,
                         compiled_flops_per_device=hlo_stats(compiled.as_text())["flops"])
    return out


def plan(args) -> dict:
    import jax

    from svi_jax import sharding
    from svi_jax.erft.sharded import bank_mode, num_bank_replicas
    from svi_jax.models.dit import DiTConfig
    from svi_jax.models.layers import resolve_attention
    from svi_jax.train.config import latent_shape, validate_config

    config = load_config(args.config, args.set)
    mesh_cfg = dict(config.mesh)
    if args.mesh:
        mesh_cfg = {a: 1 for a in sharding.MESH_AXES}
        mesh_cfg.update(parse_mesh(args.mesh))
    sizes = sharding.mesh_shape(mesh_cfg, args.devices)
    config.mesh.update(sizes)
    requested = config.model.attention
    if args.attention:  # an explicit override (the report says so); otherwise exactly what the trainer builds
        config.model.attention = args.attention
    if bank_mode(config) == "replica" and not config.erft.get("bank_replicas", 0):
        config.erft.bank_replicas = sizes["data"]
    validate_config(config)
    topology = ""
    if args.target == "tpu":
        topology = args.topology or default_topology(args.chip, args.devices)
        devices = tpu_devices(topology)
        if len(devices) != args.devices:
            raise ValueError(f"topology {topology} has {len(devices)} chips, --devices says {args.devices}")
    else:
        devices = jax.devices()
        if len(devices) != args.devices:
            raise RuntimeError(f"expected {args.devices} devices, JAX sees {len(devices)} "
                               f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    batch_size = args.batch or sizes["data"] * sizes["fsdp"]
    F, H, W, C = latent_shape(config)
    dit_cfg = DiTConfig.from_dict(config.model.to_dict())
    resolved = resolve_attention(config.model.attention, devices[0].platform, len(devices))

    inputs = resolve_inputs(config, args.inputs)
    t0 = time.time()
    built, batch = _build(config, devices, sizes, batch_size, inputs)
    jitted, state = built.step, built.state
    lowered = jitted.lower(state, batch)
    lower_s = time.time() - t0
    t0 = time.time()
    compiled = lowered.compile()
    compile_s = time.time() - t0

    mem = compiled.memory_analysis()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})
    stats = hlo_stats(compiled.as_text())

    # per-part argument bytes from the shard shapes
    s_sh, b_sh = jitted.jitted.in_shardings
    parts = {"params": sharding.per_device_bytes(state.params["dit"], s_sh.params["dit"])}
    enc_names = [k for k in state.params if k != "dit"]
    if enc_names:   # the frozen VAE/UMT5/CLIP (pixel inputs)
        parts["encoders"] = sharding.per_device_bytes({k: state.params[k] for k in enc_names},
                                                      {k: s_sh.params[k] for k in enc_names})
    saved, saved_sh = state.checkpoint(), s_sh.checkpoint()
    for name in saved:
        if name != "dit":   # a full fine-tune's DiT: counted with the params
            parts[name] = sharding.per_device_bytes(saved[name], saved_sh[name])
    parts["batch"] = sharding.per_device_bytes(batch, b_sh)
    if enc_names:   # the DiT step takes the encoders' outputs; the caller still holds the pixel batch meanwhile
        parts["inputs"] = sharding.per_device_bytes(jitted.abstract_inputs, jitted.input_shardings)
    bank_bytes = parts.get("banks", 0)
    K = int(config.erft.capacity)

    args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias_b, temp_b = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    dit_peak = args_b + out_b - alias_b + temp_b + (parts["batch"] if enc_names else 0)
    encoders = None
    if enc_names:   # the encoders' program runs first, beside the rest of the state
        resident = sum(v for k, v in parts.items() if k not in ("encoders", "batch", "inputs"))
        encoders = encoder_report(built, batch, resident)
    peak = max(dit_peak, encoders["peak_with_state"] * GB if encoders else 0)
    chip = CHIPS[args.chip]
    hbm = chip["hbm_gb"] * GB
    lora_params = sum(int(math.prod(a.shape)) for a in jax.tree.leaves(state.lora or {})) \
        // max(dit_cfg.num_layers, 1) * dit_cfg.num_layers
    ana = analytic_flops(dit_cfg, (F, H, W), batch_size, dit_cfg.text_len,
                         config.model.remat_policy != "none", int(config.lora.rank), lora_params)
    enc_flops = encoders["flops_per_device"] if encoders else 0.0
    compiled_total = (stats["flops"] + enc_flops) * args.devices
    dit_total = stats["flops"] * args.devices
    per_slot = bank_bytes / K if K else 0.0
    headroom = hbm - (peak - bank_bytes)
    report = {
        "label": args.label,
        "config": args.config,
        "overrides": list(args.set),
        "devices": args.devices,
        "mesh": sizes,
        "chip": args.chip,
        "chip_hbm_gb": chip["hbm_gb"],
        "batch": batch_size,
        "inputs": inputs,
        "encoders": encoders,
        "latent": [F, H, W, C],
        "tokens_per_clip": (F // dit_cfg.patch_size[0]) * (H // dit_cfg.patch_size[1]) * (W // dit_cfg.patch_size[2]),
        "model": dict({k: getattr(dit_cfg, k) for k in ("model_type", "dim", "num_layers", "num_heads", "ffn_dim",
                                                            "param_dtype", "dtype", "remat_policy")},
                      attention=resolved, attention_config=requested,
                      attention_override=args.attention or None),
        "lora_rank": int(config.lora.rank),
        "erft": {"bank_mode": bank_mode(config),
                 "bank_replicas": num_bank_replicas(config, args.devices),
                 "num_grids": int(config.erft.num_grids), "capacity": K, "bank_dtype": config.erft.bank_dtype},
        "per_device_gb": {
            "arguments": args_b / GB, "outputs": out_b / GB, "aliased": alias_b / GB, "temporaries": temp_b / GB,
            "peak": peak / GB, "peak_dit_step": dit_peak / GB,
            "peak_encoders": encoders["peak_with_state"] if encoders else None,
            "generated_code": mem.generated_code_size_in_bytes / GB,
            "argument_parts": {k: v / GB for k, v in parts.items()},
        },
        "fits": bool(peak <= hbm),
        "bank_gb_per_device_per_capacity_slot": per_slot / GB,
        "max_capacity_that_fits": int(max(0, headroom) // per_slot) if per_slot else None,
        "flops": {
            "compiled_per_device": stats["flops"] + enc_flops,
            "compiled_dit_step_per_device": stats["flops"],
            "compiled_total": compiled_total,
            "xla_cost_analysis_per_device_loop_bodies_once": float(ca.get("flops", 0.0)),
            "analytic_forward": ana["forward"],
            "analytic_attention_forward": ana["attention_forward"],
            "analytic_step": ana["step"],
            "analytic_three_x_forward": ana["three_x_forward"],
            "compiled_encoders_per_device": enc_flops,
            "compiled_over_analytic_step": dit_total / ana["step"] if ana["step"] else None,
            "ideal_step_s_at_peak": (stats["flops"] + enc_flops) / (chip["bf16_tflops"] * 1e12),
        },
        "collective_gb_per_device": stats["collective_bytes"] / GB,
        "collective_gb_by_kind": {k: v / GB for k, v in stats["collective_bytes_by_kind"].items()},
        "remat_policies": (remat_report(config, devices, sizes, batch_size, _policies(args.remat_policies),
                                        chip["hbm_gb"], inputs, (parts["batch"] / GB) if encoders else 0.0,
                                        encoders["peak_with_state"] if encoders else 0.0)
                           if args.remat_policies else {}),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "jax": jax.__version__,
        "target": args.target,
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "backend": ("XLA:CPU fake devices (--xla_force_host_platform_device_count)" if args.target == "cpu" else
                    f"TPU compiler (libtpu, ahead of time for {topology}, no TPU attached)"),
    }
    return report


def _policies(text: str) -> list:
    if text == "all":
        return ["full", "save_attention", "offload_attention"]
    return [p.strip() for p in text.split(",") if p.strip()]


def format_report(r: dict) -> str:
    m, fl, pd = r["mesh"], r["flops"], r["per_device_gb"]
    mesh = " x ".join(f"{k}={v}" for k, v in m.items() if v > 1) or "1 device"
    lines = [
        f"plan: {r['config']} on {r['devices']} devices ({mesh}), chip {r['chip']} ({r['chip_hbm_gb']:.0f} GB), "
        f"compiled for {r['target']}{' ' + r['topology'] if r['topology'] else ''} ({r['device_kind']})",
        f"  batch {r['batch']} clips, latent {r['latent']}, {r['tokens_per_clip']} tokens/clip, "
        f"model {r['model']['dim']}x{r['model']['num_layers']} {r['model']['param_dtype']}, "
        f"attention {r['model']['attention']}"
        f"{' (override --attention)' if r['model'].get('attention_override') else ''}, "
        f"remat {r['model']['remat_policy']}, LoRA r{r['lora_rank']}, inputs {r.get('inputs', 'latents')}",
        f"  banks: {r['erft']['bank_mode']} x{r['erft']['bank_replicas']}, {r['erft']['num_grids']} grids x "
        f"{r['erft']['capacity']} {r['erft']['bank_dtype']}",
        "  per device (GB): arguments {:.2f}  outputs {:.2f}  aliased {:.2f}  temporaries {:.2f}  -> peak {:.2f} "
        "({})".format(pd["arguments"], pd["outputs"], pd["aliased"], pd["temporaries"], pd["peak"],
                      "fits" if r["fits"] else "DOES NOT FIT"),
        "  arguments by part (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in pd["argument_parts"].items()),
        f"  bank GB per device per capacity slot: {r['bank_gb_per_device_per_capacity_slot']:.4f}; "
        f"largest capacity that fits: {r['max_capacity_that_fits']}",
        "  FLOPs: compiled {:.3e}/device, {:.3e} total; analytic step {:.3e} (forward {:.3e}); ratio {:.3f}".format(
            fl["compiled_per_device"], fl["compiled_total"], fl["analytic_step"], fl["analytic_forward"],
            fl["compiled_over_analytic_step"] or float("nan"))
        + (" (ratio: the DiT step alone)" if r.get("encoders") else ""),
        f"  ideal step time at peak bf16: {fl['ideal_step_s_at_peak']:.2f} s; collectives "
        f"{r['collective_gb_per_device']:.1f} GB/device/step",
        f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
    ]
    if r.get("encoders"):
        e = r["encoders"]
        lines.insert(5, "  frozen encoders, their own program before the DiT step (pixel inputs): {:.2f} GB params/device, "
                     "{:.3e} FLOPs/device, {:.2f} GB temporaries, peak {:.2f} GB with the rest of the state; the DiT "
                     "step's peak {:.2f} GB (a latent cache skips the encoders: --inputs latents)".format(
                         pd["argument_parts"].get("encoders", 0.0), e["flops_per_device"], e["temporaries"],
                         e["peak_with_state"], pd["peak_dit_step"]))
    for name, p in r.get("remat_policies", {}).items():
        if "error" in p:
            lines.append(f"  remat {name}: DOES NOT FIT ({p['error']})")
            continue
        lines.append(f"  remat {name}: peak {p['peak']:.2f} GB/device (temporaries {p['temporaries']:.2f}) "
                     f"{'fits' if p['fits'] else 'DOES NOT FIT'}, compiled {p['compiled_flops_per_device']:.3e} "
                     f"FLOPs/device")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.target == "cpu":
        ensure_devices(args.devices, argv)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; the TPU is compile-only
    try:
        if args.sample:
            from svi_jax import sample_plan

            report = sample_plan.run(args, load_config(args.config, args.set))
        else:
            report = plan(args)
    except Exception as e:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: the step does not fit this target: {str(e).strip().splitlines()[0][:400]}", file=sys.stderr)
        return 3
    print((sample_plan.format_report if args.sample else format_report)(report), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    sys.exit(cli.run(main))
