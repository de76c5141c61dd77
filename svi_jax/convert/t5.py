"""Convert the UMT5 encoder: official Wan ``models_t5_umt5-xxl-enc-bf16.pth`` or transformers ``UMT5EncoderModel``.

Layouts are detected from the tensor names:

* official (``wan/modules/t5.py``, ``T5Encoder`` with ``shared_pos=False``): ``token_embedding.weight``,
  ``blocks.{i}.{norm1,norm2}.weight``, ``blocks.{i}.attn.{q,k,v,o}.weight``, ``blocks.{i}.ffn.{gate.0,fc1,fc2}.weight``,
  ``blocks.{i}.pos_embedding.embedding.weight``, ``norm.weight``;
* transformers (a directory with ``config.json`` + safetensors, or a single file): ``shared.weight`` /
  ``encoder.embed_tokens.weight``, ``encoder.block.{i}.layer.0.{SelfAttention.{q,k,v,o,relative_attention_bias},
  layer_norm}``, ``encoder.block.{i}.layer.1.{DenseReluDense.{wi_0,wi_1,wo},layer_norm}``,
  ``encoder.final_layer_norm.weight`` (decoder / lm_head tensors of a full UMT5 checkpoint are skipped).

Sizes come from the tensors; ``max_distance``/``eps`` from ``config.json`` when present (else Wan's 128 / 1e-6).
"""
from __future__ import annotations

import os
import re

import numpy as np

from svi_jax.convert.common import (Assembler, BF16, ConversionError, TensorSource, parse_dtype, peak_rss_mb,
                                    progress)

OFFICIAL_BLOCK = {  # official per-block suffix -> (our path under blocks/, transpose)
    "norm1.weight": ("norm1/scale", False),
    "attn.q.weight": ("attn/q/kernel", True),
    "attn.k.weight": ("attn/k/kernel", True),
    "attn.v.weight": ("attn/v/kernel", True),
    "attn.o.weight": ("attn/o/kernel", True),
    "norm2.weight": ("norm2/scale", False),
    "ffn.gate.0.weight": ("ffn/gate/kernel", True),
    "ffn.fc1.weight": ("ffn/fc1/kernel", True),
    "ffn.fc2.weight": ("ffn/fc2/kernel", True),
    "pos_embedding.embedding.weight": ("pos_embedding", False),
}
HF_BLOCK = {
    "layer.0.layer_norm.weight": ("norm1/scale", False),
    "layer.0.SelfAttention.q.weight": ("attn/q/kernel", True),
    "layer.0.SelfAttention.k.weight": ("attn/k/kernel", True),
    "layer.0.SelfAttention.v.weight": ("attn/v/kernel", True),
    "layer.0.SelfAttention.o.weight": ("attn/o/kernel", True),
    "layer.0.SelfAttention.relative_attention_bias.weight": ("pos_embedding", False),
    "layer.1.layer_norm.weight": ("norm2/scale", False),
    "layer.1.DenseReluDense.wi_0.weight": ("ffn/gate/kernel", True),
    "layer.1.DenseReluDense.wi_1.weight": ("ffn/fc1/kernel", True),
    "layer.1.DenseReluDense.wo.weight": ("ffn/fc2/kernel", True),
}
LAYOUTS = {  # layout -> (block prefix, per-block map, embedding keys (first present wins), final norm key)
    "official": ("blocks.", OFFICIAL_BLOCK, ("token_embedding.weight",), "norm.weight"),
    "transformers": ("encoder.block.", HF_BLOCK, ("shared.weight", "encoder.embed_tokens.weight"),
                     "encoder.final_layer_norm.weight"),
}


def add_arguments(p) -> None:
    p.add_argument("--src", required=True,
                   help="models_t5_umt5-xxl-enc-bf16.pth, or a transformers UMT5 directory / safetensors file")
    p.add_argument("--dst", required=True, help="output directory (config.json + params/ [+ tokenizer/])")
    p.add_argument("--tokenizer", default=None,
                   help="local google/umt5-xxl tokenizer directory; its files are copied to DST/tokenizer")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16"],
                   help="stored param dtype: auto (bfloat16 for a bf16 source, else float32), float32, bfloat16")
    p.add_argument("--text_len", type=int, default=512, help="tokenizer length (Wan: 512)")
    p.add_argument("--max_distance", type=int, default=None,
                   help="relative-position max distance (default: config.json, else 128 as in Wan)")


def detect_layout(src: TensorSource) -> str:
    keys = src.keys()
    if any(k.startswith("blocks.") for k in keys) and "token_embedding.weight" in src:
        return "official"
    if any(k.startswith("encoder.block.") for k in keys):
        return "transformers"
    raise ConversionError(f"{src.src} does not look like a UMT5 encoder (neither the official Wan layout "
                          f"'token_embedding.weight', 'blocks.N.*' nor transformers 'encoder.block.N.*'); "
                          f"first keys: {keys[:8]}")


def _layers(src: TensorSource, prefix: str) -> int:
    idx = {int(m.group(1)) for k in src.keys() if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx:
        raise ConversionError(f"{src.src}: no encoder blocks '{prefix}N.*'")
    return max(idx) + 1


def infer_config(src: TensorSource, layout: str, text_len: int = 512, max_distance: int | None = None) -> dict:
    prefix, block, emb_keys, _ = LAYOUTS[layout]
    # a config.json beside an official .pth is the DiT's (Wan release dir): only trust it for transformers
    hf = (src.config or {}) if layout == "transformers" else {}
    if layout == "transformers":
        if hf.get("model_type") not in (None, "umt5"):
            raise ConversionError(f"{src.src}: config.json has model_type {hf.get('model_type')!r}; only UMT5 "
                                  f"(per-layer relative position bias) is supported")
        if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ConversionError(f"{src.src}: feed_forward_proj {hf['feed_forward_proj']!r}, expected 'gated-gelu'")
    n = _layers(src, prefix)
    by_dst = {dst: suffix for suffix, (dst, _) in block.items()}
    rel_key, q_key, fc1_key = by_dst["pos_embedding"], by_dst["attn/q/kernel"], by_dst["ffn/fc1/kernel"]
    if n > 1 and f"{prefix}0.{rel_key}" in src and f"{prefix}1.{rel_key}" not in src:
        raise ConversionError(f"{src.src}: only block 0 has a relative position bias -- this is a T5 checkpoint "
                              f"with one shared bias, not UMT5 (which has one per layer)")
    emb = next((k for k in emb_keys if k in src), None)
    if emb is None:
        raise ConversionError(f"{src.src}: missing token embedding (one of {list(emb_keys)})")
    for suffix in (rel_key, q_key, fc1_key):
        if f"{prefix}0.{suffix}" not in src:
            raise ConversionError(f"{src.src}: missing key '{prefix}0.{suffix}'")
    vocab, dim = src.shape(emb)
    buckets, heads = src.shape(f"{prefix}0.{rel_key}")
    dim_attn = src.shape(f"{prefix}0.{q_key}")[0]
    dim_ffn = src.shape(f"{prefix}0.{fc1_key}")[0]
    if "num_layers" in hf and int(hf["num_layers"]) != n:
        raise ConversionError(f"{src.src}: config.json num_layers {hf['num_layers']} but the tensors have {n} blocks")
    if "num_heads" in hf and int(hf["num_heads"]) != heads:
        raise ConversionError(f"{src.src}: config.json num_heads {hf['num_heads']} but the position bias has "
                              f"{heads} heads")
    md = max_distance if max_distance is not None else int(hf.get("relative_attention_max_distance", 128))
    return dict(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads, num_layers=n,
                num_buckets=buckets, max_distance=md, eps=float(hf.get("layer_norm_epsilon", 1e-6)),
                text_len=int(text_len))


def _source_is_bf16(src: TensorSource, key: str) -> bool:
    return src.is_half(key)


def convert(src_path: str, dtype: str = "auto", text_len: int = 512, max_distance: int | None = None):
    """-> ``(config dict, flat params {path: np.ndarray})``."""
    from svi_jax.models.t5 import T5Config, param_shapes
    from svi_jax.model_dirs import flatten

    src = TensorSource(src_path)
    layout = detect_layout(src)
    prefix, block, emb_keys, norm_key = LAYOUTS[layout]
    cfg = infer_config(src, layout, text_len, max_distance)
    np_dtype = parse_dtype(dtype)
    if np_dtype is None:
        np_dtype = BF16 if (norm_key in src and _source_is_bf16(src, norm_key)) else np.dtype(np.float32)
    cfg["param_dtype"] = "bfloat16" if np_dtype == BF16 else np.dtype(np_dtype).name
    config = T5Config.from_dict(cfg)
    spec = {k: (tuple(v.shape), np_dtype) for k, v in flatten(param_shapes(config)).items()}
    asm = Assembler(spec, f"{src_path} ({layout} UMT5 layout)")

    emb = next(k for k in emb_keys if k in src)
    work = [(emb, "token_embedding", None, False), (norm_key, "norm/scale", None, False)]
    for i in range(config.num_layers):
        for suffix, (dst, transpose) in block.items():
            work.append((f"{prefix}{i}.{suffix}", f"blocks/{dst}", i, transpose))
    for key, dst, layer, transpose in progress(work, total=len(work), desc=f"UMT5 ({layout})"):
        if key not in src:
            raise ConversionError(f"cannot convert {src_path}: missing key {key!r} (for {dst}"
                                  f"{'' if layer is None else f' layer {layer}'})")
        value = src.get(key)
        asm.put(dst, value.T if transpose else value, key, layer)

    def ignore(k: str) -> bool:
        if layout == "official":
            return False
        # the tied duplicate embedding and the decoder half of a full UMT5 checkpoint
        return k in emb_keys or k.startswith(("decoder.", "lm_head.")) or k.endswith("position_ids")

    arrays = asm.finish(src.keys(), ignore=ignore)
    return config.to_dict(), arrays


def run(args) -> str:
    from svi_jax.model_dirs import save_model, unflatten
    from svi_jax.models.tokenizer import Tokenizer, TokenizerError, copy_tokenizer

    if args.tokenizer is not None:  # fail before a long conversion
        try:
            Tokenizer(args.tokenizer, args.text_len)
        except TokenizerError as e:
            raise ConversionError(str(e)) from e
    config, arrays = convert(args.src, args.dtype, args.text_len, args.max_distance)
    out = save_model(args.dst, "t5", config, unflatten(arrays))
    if args.tokenizer is not None:
        copy_tokenizer(args.tokenizer, os.path.join(out, "tokenizer"))
    n = sum(a.size for a in arrays.values())
    print(f"UMT5 encoder: {config['num_layers']} layers, dim {config['dim']}, {n / 1e9:.2f}B params "
          f"({config['param_dtype']}) -> {out}   [peak RSS {peak_rss_mb():.0f} MB]")
    return out
