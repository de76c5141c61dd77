"""Wan2.2-A14B (I2V or T2V): both experts -> one svi_jax two-expert directory (``svi_jax.load`` -> DiTExperts).

Source layouts (detected from the folder names):

* official (``Wan-AI/Wan2.2-I2V-A14B``): ``high_noise_model/`` and ``low_noise_model/``, each a sharded
  ``diffusion_pytorch_model-*.safetensors`` in Wan's naming with its ``config.json``;
* diffusers (``Wan-AI/Wan2.2-I2V-A14B-Diffusers``): ``transformer/`` (the high-noise stage) and ``transformer_2/``
  (the low-noise stage), ``model_index.json`` with ``boundary_ratio``.

Each expert goes through the Wan DiT converter (:mod:`svi_jax.convert.dit`: layout per tensor name, dimensions from
the tensors; a Wan2.2 I2V expert has ``in_dim`` 36 and no ``img_emb`` -> ``image_embedding=False``). The output is
``DST/high``, ``DST/low`` (ordinary DiT directories) and ``DST/config.json`` (kind ``dit_experts``) with the base
model's own boundary: ``boundary_ratio`` of ``model_index.json``, else Wan2.2's config (I2V 0.900, T2V 0.875).
"""
from __future__ import annotations

import json
import os

from svi_jax.convert.common import ConversionError

LAYOUTS = {"official": ("high_noise_model", "low_noise_model"), "diffusers": ("transformer", "transformer_2")}


def find_experts(src: str) -> tuple[str, str, str]:
    """``(layout, high_dir, low_dir)`` of a Wan2.2-A14B folder."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src} is not a directory: expected a Wan2.2-A14B folder with high_noise_model/ + "
                              f"low_noise_model/ (official) or transformer/ + transformer_2/ (diffusers)")
    for layout, (hi, lo) in LAYOUTS.items():
        h, l_ = os.path.join(src, hi), os.path.join(src, lo)
        if os.path.isdir(h) and os.path.isdir(l_):
            return layout, h, l_
        if os.path.isdir(h) or os.path.isdir(l_):
            missing = lo if os.path.isdir(h) else hi
            raise ConversionError(f"{src} has only one expert: {missing}/ is missing (Wan2.2-A14B has two)")
    raise ConversionError(f"{src} holds neither high_noise_model/ + low_noise_model/ (official Wan2.2) nor "
                          f"transformer/ + transformer_2/ (diffusers)")


def source_boundary(src: str, model_type: str) -> float:
    """The base model's boundary ratio: diffusers ``model_index.json`` ``boundary_ratio``, else Wan2.2's config."""
    from svi_jax.models.experts import WAN22_BOUNDARY

    idx = os.path.join(src, "model_index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            b = json.load(f).get("boundary_ratio")
        if b is not None:
            return float(b)
    return WAN22_BOUNDARY[model_type]


def convert(src: str, dst: str, dtype: str | None = None, num_heads: int | None = None,
            show_progress: bool = True) -> dict:
    from svi_jax.convert import dit
    from svi_jax.models.experts import write_meta

    layout, high_dir, low_dir = find_experts(src)
    os.makedirs(dst, exist_ok=True)
    summaries = {}
    for name, d in (("high", high_dir), ("low", low_dir)):
        summaries[name] = dit.convert(d, os.path.join(dst, name), dtype, num_heads, show_progress=show_progress)
    ch, cl = summaries["high"]["config"], summaries["low"]["config"]
    diff = [k for k in ch if k != "param_dtype" and ch[k] != cl[k]]
    if diff:
        raise ConversionError(f"the two experts differ in {diff}: high {[ch[k] for k in diff]}, "
                              f"low {[cl[k] for k in diff]}")
    boundary = source_boundary(src, ch["model_type"])
    write_meta(dst, boundary, {"layout": layout, "src": os.path.abspath(src)})
    return {"layout": layout, "config": ch, "boundary": boundary,
            "num_params": summaries["high"]["num_params"] + summaries["low"]["num_params"],
            "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries.values())}


def add_arguments(p):
    p.add_argument("--src", required=True, help="Wan2.2-A14B folder: high_noise_model/ + low_noise_model/ "
                                                "(official) or transformer/ + transformer_2/ (diffusers)")
    p.add_argument("--dst", required=True, help="output directory (DST/high, DST/low, DST/config.json)")
    from svi_jax.convert.dit import add_common_arguments

    add_common_arguments(p)


def run(args):
    s = convert(args.src, args.dst, args.dtype, args.num_heads, show_progress=not args.no_progress)
    c = s["config"]
    clip = "" if c.get("image_embedding", True) or c["model_type"] != "i2v" else ", no CLIP branch"
    print(f"converted {s['layout']} Wan2.2 {c['model_type'].upper()} experts (high + low): dim {c['dim']}, "
          f"{c['num_layers']} layers, {c['num_heads']} heads{clip}, boundary {s['boundary']}, "
          f"{s['num_params'] / 1e6:.1f}M params ({c['param_dtype']}) -> {args.dst}  [peak RSS {s['peak_rss_mb']:.0f} MB]")
