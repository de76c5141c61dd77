"""Wan2.1 DiT: official layout or diffusers ``WanTransformer3DModel`` -> svi_jax checkpoint (and back).

Layout detection: official keys look like ``blocks.0.self_attn.q.weight``; diffusers keys like
``blocks.0.attn1.to_q.weight``. T2V vs I2V and every dimension come from the tensors; ``num_heads``, ``eps`` and
``text_len`` (which no tensor reveals) from a ``config.json`` beside the weights, else flags, else Wan's defaults
(head_dim 128, eps 1e-6, text_len 512).
"""
from __future__ import annotations

import logging
import math
import re

import numpy as np

from svi_jax.convert.common import (Assembler, ConversionError, TensorSource, block_index, parse_dtype, peak_rss_mb,
                                    progress)

log = logging.getLogger(__name__)

# diffusers name fragment -> official name fragment (applied to the dotted key, in order)
_DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),      # diffusers' norm2 is Wan's cross-attention norm3
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."), (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img."),
]
_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "pipe.dit.", "dit.")


def diffusers_to_official(key: str) -> str:
    for pat, rep in _DIFFUSERS_TO_OFFICIAL:
        key = re.sub(pat, rep, key)
    return key


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(".self_attn." in k for k in keys) and "patch_embedding.weight" in keys:
        return "official"
    raise ConversionError("cannot tell the checkpoint layout: expected official Wan keys (blocks.N.self_attn.q.weight) "
                          f"or diffusers keys (blocks.N.attn1.to_q.weight); first keys: {keys[:5]}")


class _OfficialView:
    """Official-named read access over either layout."""

    def __init__(self, src: TensorSource):
        self.src = src
        self.layout = detect_layout(src.keys())
        if self.layout == "diffusers":
            self.map = {diffusers_to_official(k): k for k in src.keys()}
        else:
            self.map = {k: k for k in src.keys()}
        # Keys that carry no weights we use (e.g. rope buffers saved by some exporters).
        self.ignored = {k for k in self.map if k.startswith("freqs") or k.endswith(".freqs")}

    def keys(self):
        return [k for k in self.map if k not in self.ignored]

    def has(self, k):
        return k in self.map

    def shape(self, k):
        return self.src.shape(self.map[k])

    def get(self, k):
        return self.src.get(self.map[k])


def infer_config(view: _OfficialView, cfg_json: dict | None, num_heads: int | None = None) -> dict:
    cfg_json = cfg_json or {}
    need = ["patch_embedding.weight", "time_embedding.0.weight", "text_embedding.0.weight", "head.head.weight",
            "blocks.0.ffn.0.weight"]
    for k in need:
        if not view.has(k):
            raise ConversionError(f"missing key {k!r} (in official naming) in {view.src.src}")
    dim, in_dim, *patch = view.shape("patch_embedding.weight")
    layers = 1 + max(bi[0] for k in view.keys() if (bi := block_index(k)) is not None)
    heads = num_heads or cfg_json.get("num_heads") or cfg_json.get("num_attention_heads")
    if not heads:
        if dim % 128:
            raise ConversionError(f"cannot infer num_heads for dim {dim}: pass --num_heads or put a config.json "
                                  f"beside the weights")
        heads = dim // 128
        log.warning("no config.json: assuming head_dim 128 -> num_heads %d", heads)
    out = view.shape("head.head.weight")[0]
    if out % math.prod(patch):
        raise ConversionError(f"head.head.weight {view.shape('head.head.weight')} is not a multiple of patch {patch}")
    clip = view.has("img_emb.proj.1.weight")
    # I2V: Wan2.1 has the CLIP branch; Wan2.2-A14B I2V has none and is told by its y channels (in_dim > out_dim)
    i2v = clip or int(in_dim) > out // math.prod(patch)
    out_cfg = dict(
        model_type="i2v" if i2v else "t2v",
        dim=int(dim), num_layers=int(layers), num_heads=int(heads),
        ffn_dim=int(view.shape("blocks.0.ffn.0.weight")[0]),
        freq_dim=int(view.shape("time_embedding.0.weight")[1]),
        text_dim=int(view.shape("text_embedding.0.weight")[1]),
        text_len=int(cfg_json.get("text_len", 512)),
        in_dim=int(in_dim), out_dim=int(out // math.prod(patch)), patch_size=[int(p) for p in patch],
        eps=float(cfg_json.get("eps", 1e-6)),
        qk_norm=view.has("blocks.0.self_attn.norm_q.weight"),
        cross_attn_norm=view.has("blocks.0.norm3.weight"),
        image_dim=int(view.shape("img_emb.proj.1.weight")[1]) if clip else 1280,
        image_embedding=bool(clip or not i2v),
    )
    if view.has("audio_proj.proj1.weight"):
        from svi_jax.convert.multitalk import infer_audio_config

        out_cfg.update(infer_audio_config(view, cfg_json))
    return out_cfg


def official_key(path: str, layer: int | None) -> tuple[str, str]:
    """Our flat path -> (official key, how to transform the tensor: 'linear' | 'conv' | 'same')."""
    parts = path.split("/")
    if parts[0] == "blocks":
        parts = ["blocks", str(layer)] + parts[1:]
    leaf = parts[-1]
    if leaf == "kernel":
        how = "conv" if parts[0] == "patch_embedding" else "linear"
        parts[-1] = "weight"
    elif leaf == "scale":
        how, parts[-1] = "same", "weight"
    else:
        how = "same"
    return ".".join(parts), how


def to_ours(value: np.ndarray, how: str) -> np.ndarray:
    if how == "linear":
        return value.T
    if how == "conv":  # [dim, C, p, q, r] -> [p, q, r, C, dim]
        return value.transpose(2, 3, 4, 1, 0)
    return value


def to_official(value: np.ndarray, how: str) -> np.ndarray:
    if how == "linear":
        return value.T
    if how == "conv":
        return value.transpose(4, 3, 0, 1, 2)
    return value


def convert(src_path: str, dst: str, dtype: str | None = None, num_heads: int | None = None,
            show_progress: bool = True, multitalk: str | None = None) -> dict:
    """Convert and write ``dst``; returns a summary (layout, config, peak RSS)."""
    import jax

    from svi_jax.model_dirs import flatten, save_model, unflatten
    from svi_jax.models.dit import DiTConfig, param_shapes

    src = TensorSource(src_path, strip_prefixes=_STRIP_PREFIXES)
    from svi_jax.convert.multitalk import with_multitalk

    src = with_multitalk(src, multitalk)
    view = _OfficialView(src)
    cfg_d = infer_config(view, src.config, num_heads)
    out_dtype = parse_dtype(dtype)
    if out_dtype is None:
        out_dtype = parse_dtype("bfloat16") if src.is_half(view.map["patch_embedding.weight"]) else np.dtype(np.float32)
    cfg_d["param_dtype"] = "bfloat16" if out_dtype == parse_dtype("bfloat16") else "float32"
    cfg = DiTConfig.from_dict(cfg_d)
    shapes = flatten(param_shapes(cfg))
    asm = Assembler({k: (tuple(v.shape), out_dtype) for k, v in shapes.items()}, src_path)

    jobs = []
    for path, sds in shapes.items():
        layers = range(sds.shape[0]) if path.startswith("blocks/") else [None]
        for i in layers:
            jobs.append((path, i))
    it = progress(jobs, desc=f"dit ({view.layout})") if show_progress else jobs
    for path, i in it:
        key, how = official_key(path, i)
        if not view.has(key):
            want = shapes[path].shape[1:] if i is not None else shapes[path].shape
            raise ConversionError(f"missing key {key!r} (our {path}{'' if i is None else f'[{i}]'}, "
                                  f"expected shape {tuple(to_official(np.empty(want, np.int8), how).shape)}) "
                                  f"in {src_path} ({view.layout} layout)")
        src_shape = tuple(view.shape(key))
        want = tuple(shapes[path].shape[1:] if i is not None else shapes[path].shape)
        got = tuple(to_ours(np.empty(src_shape, np.int8), how).shape)
        if got != want:
            exp_src = tuple(to_official(np.empty(want, np.int8), how).shape)
            raise ConversionError(f"shape mismatch for key {view.map[key]!r}: expected {exp_src}, got {src_shape}")
        asm.put(path, to_ours(view.get(key), how), key, layer=i)
    arrays = asm.finish(view.keys())
    params = unflatten(arrays)
    save_model(dst, "dit", cfg.to_dict(), params)
    summary = {"layout": view.layout, "config": cfg.to_dict(), "peak_rss_mb": round(peak_rss_mb(), 1),
               "num_params": int(sum(a.size for a in arrays.values()))}
    del jax
    return summary


def export_official(src_dir: str, dst_file: str) -> dict:
    """Our DiT checkpoint -> one official-layout ``.safetensors`` file (+ ``config.json`` beside it)."""
    import json
    import os

    import torch
    from safetensors.torch import save_file

    from svi_jax.model_dirs import flatten
    from svi_jax.models.dit import DiT

    model = DiT.from_dir(src_dir)
    out = {}
    for path, arr in flatten(model.params).items():
        arr = np.asarray(arr.astype(np.float32)) if str(arr.dtype) == "bfloat16" else np.asarray(arr)
        layers = range(arr.shape[0]) if path.startswith("blocks/") else [None]
        for i in layers:
            key, how = official_key(path, i)
            v = arr[i] if i is not None else arr
            out[key] = torch.from_numpy(np.array(to_official(v, how), copy=True, order="C"))
            if model.config.param_dtype == "bfloat16":
                out[key] = out[key].to(torch.bfloat16)
    os.makedirs(os.path.dirname(os.path.abspath(dst_file)), exist_ok=True)
    save_file(out, dst_file)
    c = model.config
    with open(os.path.join(os.path.dirname(os.path.abspath(dst_file)), "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "model_type": c.model_type, "dim": c.dim, "num_layers": c.num_layers,
                   "num_heads": c.num_heads, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "text_len": c.text_len,
                   "in_dim": c.in_dim, "out_dim": c.out_dim, "eps": c.eps, "patch_size": list(c.patch_size)}, f,
                  indent=2)
    return {"tensors": len(out), "file": dst_file}


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(p):
    p.add_argument("--src", required=True, help="official Wan dir/file (diffusion_pytorch_model*.safetensors, .pth) "
                                                "or a diffusers WanTransformer3DModel dir")
    p.add_argument("--dst", required=True, help="output directory (config.json + orbax params)")
    p.add_argument("--multitalk", default=None,
                   help="SVI-Talk: also read the MultiTalk audio layers from this multitalk.safetensors (default: "
                        "SRC/multitalk.safetensors when SRC is a directory holding one)")
    add_common_arguments(p)


def add_common_arguments(p):
    """``--dtype``, ``--num_heads`` and ``--no_progress`` of every DiT converter (``dit``, ``wan22``)."""
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="stored param dtype (auto: bf16 if the source is half precision, else fp32)")
    p.add_argument("--num_heads", type=int, default=None, help="override when no config.json is beside the weights")
    p.add_argument("--no_progress", action="store_true")


def run(args):
    s = convert(args.src, args.dst, args.dtype, args.num_heads, show_progress=not args.no_progress,
                multitalk=args.multitalk)
    c = s["config"]
    print(f"converted {s['layout']} {c['model_type'].upper()} DiT: dim {c['dim']}, {c['num_layers']} layers, "
          f"{c['num_heads']} heads{', MultiTalk audio layers' if c.get('multitalk') else ''}, "
          f"{s['num_params'] / 1e6:.1f}M params ({c['param_dtype']}) -> {args.dst}  "
          f"[peak RSS {s['peak_rss_mb']:.0f} MB]")
