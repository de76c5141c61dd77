"""wav2vec2 (transformers ``Wav2Vec2Model`` / ``Wav2Vec2ForPreTraining`` layout, e.g.
``TencentGameMate/chinese-wav2vec2-base``) -> svi_jax checkpoint.

The source is a directory with ``config.json`` (the transformers ``Wav2Vec2Config``) and ``model.safetensors`` or
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``); ``preprocessor_config.json``'s
``do_normalize`` is kept. Keys with a ``wav2vec2.`` prefix are accepted; the pre-training heads (``quantizer.*``,
``project_q.*``, ``project_hid.*``), ``masked_spec_embed`` and ``lm_head.*`` are not used by the features and are
skipped, as ``Wav2Vec2Model.from_pretrained`` does. The positional convolution's weight norm (``weight_g`` /
``weight_v`` or ``parametrizations.weight.original0/1``, norm over all axes but the kernel axis) is folded into
one kernel.
"""
from __future__ import annotations

import json
import os

import numpy as np

from svi_jax.convert.common import Assembler, ConversionError, TensorSource, parse_dtype, peak_rss_mb

_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
           "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "num_conv_pos_embeddings",
           "num_conv_pos_embedding_groups", "layer_norm_eps", "do_stable_layer_norm")
_USED = ("feature_extractor.", "feature_projection.", "encoder.")


def read_config(src: str) -> dict:
    d = src if os.path.isdir(src) else os.path.dirname(src)
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json beside the wav2vec2 weights in {d} (the transformers Wav2Vec2Config)")
    with open(path) as f:
        hf = json.load(f)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "conv_dim", "conv_kernel", "conv_stride") if k not in hf]
    if missing:
        raise ConversionError(f"{path} lacks the wav2vec2 fields {missing}")
    if hf.get("feat_extract_activation", "gelu") != "gelu" or hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{path}: only gelu activations are supported")
    cfg = {k: hf[k] for k in _FIELDS if k in hf}
    pre = os.path.join(d, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            cfg["do_normalize"] = bool(json.load(f).get("do_normalize", True))
    return cfg


def plan(cfg) -> list[tuple[str, str, str]]:
    """``(our flat path, transformers key, transform)``; transform: linear | conv | same | posconv."""
    out = []
    for i in range(len(cfg.conv_dim)):
        out.append((f"feature_extractor/conv_layers_{i}_conv/kernel", f"feature_extractor.conv_layers.{i}.conv.weight",
                    "conv"))
        if cfg.conv_bias:
            out.append((f"feature_extractor/conv_layers_{i}_conv/bias", f"feature_extractor.conv_layers.{i}.conv.bias",
                        "same"))
        if cfg.feat_extract_norm == "layer" or i == 0:
            for ours, theirs in (("scale", "weight"), ("bias", "bias")):
                out.append((f"feature_extractor/conv_layers_{i}_layer_norm/{ours}",
                            f"feature_extractor.conv_layers.{i}.layer_norm.{theirs}", "same"))

    def norm(ours, theirs):
        out.extend([(f"{ours}/scale", f"{theirs}.weight", "same"), (f"{ours}/bias", f"{theirs}.bias", "same")])

    def dense(ours, theirs):
        out.extend([(f"{ours}/kernel", f"{theirs}.weight", "linear"), (f"{ours}/bias", f"{theirs}.bias", "same")])

    norm("feature_projection_layer_norm", "feature_projection.layer_norm")
    dense("feature_projection_projection", "feature_projection.projection")
    out.append(("encoder_pos_conv_embed_conv/kernel", "encoder.pos_conv_embed.conv", "posconv"))
    out.append(("encoder_pos_conv_embed_conv/bias", "encoder.pos_conv_embed.conv.bias", "same"))
    norm("encoder_layer_norm", "encoder.layer_norm")
    for i in range(cfg.num_hidden_layers):
        o, t = f"encoder_layers_{i}", f"encoder.layers.{i}"
        for p in ("q", "k", "v", "out"):
            dense(f"{o}/attention_{p}_proj", f"{t}.attention.{p}_proj")
        norm(f"{o}/layer_norm", f"{t}.layer_norm")
        dense(f"{o}/feed_forward_intermediate_dense", f"{t}.feed_forward.intermediate_dense")
        dense(f"{o}/feed_forward_output_dense", f"{t}.feed_forward.output_dense")
        norm(f"{o}/final_layer_norm", f"{t}.final_layer_norm")
    return out


def _pos_conv_weight(src: TensorSource, base: str) -> tuple[np.ndarray, list[str]]:
    """The effective ``[out, in/groups, k]`` weight of the weight-normed positional conv, and the keys read."""
    for g_key, v_key in ((f"{base}.weight_g", f"{base}.weight_v"),
                         (f"{base}.parametrizations.weight.original0", f"{base}.parametrizations.weight.original1")):
        if g_key in src and v_key in src:
            g, v = src.get(g_key).astype(np.float64), src.get(v_key).astype(np.float64)
            if g.shape != (1, 1, v.shape[2]):
                raise ConversionError(f"shape mismatch for key {g_key!r}: expected {(1, 1, v.shape[2])} "
                                      f"(weight norm over dim 2), got {g.shape}")
            w = g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
            return w.astype(np.float32), [g_key, v_key]
    if f"{base}.weight" in src:
        return src.get(f"{base}.weight"), [f"{base}.weight"]
    raise ConversionError(f"missing key {base + '.weight_g'!r} / {base + '.weight_v'!r} (or "
                          f"parametrizations.weight.original0/1) in {src.src}")


def _to_ours(a: np.ndarray, how: str) -> np.ndarray:
    if how == "linear":
        return a.T
    if how in ("conv", "posconv"):     # [out, in/groups, k] -> [k, in/groups, out]
        return a.transpose(2, 1, 0)
    return a


def convert(src_path: str, dst: str, dtype: str | None = None) -> dict:
    from svi_jax.model_dirs import flatten, save_model, unflatten
    from svi_jax.models.wav2vec2 import KIND, Wav2Vec2Config, param_shapes

    cfg_d = read_config(src_path)
    out_dtype = parse_dtype(dtype) or np.dtype(np.float32)
    cfg_d["param_dtype"] = "bfloat16" if out_dtype == parse_dtype("bfloat16") else "float32"
    try:
        cfg = Wav2Vec2Config.from_dict(cfg_d)
    except ValueError as e:
        raise ConversionError(f"{src_path}: {e}") from None
    src = TensorSource(src_path, strip_prefixes=("wav2vec2.",))
    if not any(k.startswith(_USED) for k in src.keys()):
        src = TensorSource(src_path)
    shapes = flatten(param_shapes(cfg))
    asm = Assembler({k: (tuple(v.shape), out_dtype) for k, v in shapes.items()}, src_path)
    for ours, key, how in plan(cfg):
        want = tuple(shapes[ours].shape)
        if how == "posconv":
            value, keys = _pos_conv_weight(src, key)
            key = keys[-1]
            asm.consumed.update(keys)
        else:
            if key not in src:
                raise ConversionError(f"missing key {key!r} (our {ours}, expected shape "
                                      f"{tuple(_to_ours(np.empty(want, np.int8), how).shape)}) in {src_path}")
            got = tuple(_to_ours(np.empty(src.shape(key), np.int8), how).shape)
            if got != want:
                raise ConversionError(f"shape mismatch for key {key!r}: expected "
                                      f"{tuple(_to_ours(np.empty(want, np.int8), how).shape)}, got {src.shape(key)}")
            value = src.get(key)
        asm.put(ours, _to_ours(value, how), key)
    arrays = asm.finish(src.keys(), ignore=lambda k: not k.startswith(_USED))
    save_model(dst, KIND, cfg.to_dict(), unflatten(arrays))
    return {"config": cfg.to_dict(), "num_params": int(sum(a.size for a in arrays.values())),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="transformers wav2vec2 directory (config.json + model.safetensors "
                                                "or pytorch_model.bin), e.g. chinese-wav2vec2-base")
    p.add_argument("--dst", required=True, help="output directory (config.json + params/)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored param dtype")


def run(args) -> None:
    s = convert(args.src, args.dst, args.dtype)
    c = s["config"]
    print(f"converted wav2vec2: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
          f"{s['num_params'] / 1e6:.1f}M params ({c['param_dtype']}) -> {args.dst}  "
          f"[peak RSS {s['peak_rss_mb']:.0f} MB]")
