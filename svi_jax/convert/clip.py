"""Convert the CLIP ViT-H/14 vision tower: official Wan open-clip ``.pth`` or transformers ``CLIPVisionModel``.

Only the blocks Wan runs are kept (all but the last: ``use_31_block=True`` = ``hidden_states[-2]``); the last
block, the post-LayerNorm, the projection head and the whole text tower are skipped.

* official (``wan/modules/clip.py``, ``XLMRobertaCLIP.visual``): ``visual.patch_embedding.weight``,
  ``visual.cls_embedding``, ``visual.pos_embedding``, ``visual.pre_norm.*``,
  ``visual.transformer.{i}.{norm1,norm2}.*``, ``.attn.to_qkv.*`` (fused q|k|v rows), ``.attn.proj.*``,
  ``.mlp.0.*``, ``.mlp.2.*`` (skipped: ``visual.post_norm.*``, ``visual.head``, ``textual.*``, ``log_scale``).
  The head count is not in the tensors: 16 for ViT-H/14 (width 1280), else pass ``--num_heads``.
* transformers (``CLIPVisionModel`` / ``CLIPModel``, keys with or without ``vision_model.``):
  ``embeddings.{patch_embedding.weight,class_embedding,position_embedding.weight}``, ``pre_layrnorm.*``,
  ``encoder.layers.{i}.{layer_norm1,layer_norm2,self_attn.{q,k,v,out}_proj,mlp.fc1,mlp.fc2}.*``.
"""
from __future__ import annotations

import re

import numpy as np

from svi_jax.convert.common import (Assembler, BF16, ConversionError, TensorSource, parse_dtype, peak_rss_mb,
                                    progress)

WAN_VIT_H_HEADS = {1280: 16}  # width -> heads of the towers Wan ships


def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, or a "
                                                "transformers CLIPVisionModel / CLIPModel directory or file")
    p.add_argument("--dst", required=True, help="output directory (config.json + params/)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16"],
                   help="stored param dtype: auto (bfloat16 for a bf16 source, else float32), float32, bfloat16")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads (default: config.json, else 16 for width 1280)")


def detect_layout(src: TensorSource) -> tuple[str, str]:
    """-> (layout, key prefix)."""
    keys = src.keys()
    if "visual.patch_embedding.weight" in src:
        return "official", "visual."
    for prefix in ("", "vision_model."):
        if f"{prefix}embeddings.patch_embedding.weight" in src:
            return "transformers", prefix
    raise ConversionError(f"{src.src} does not look like a CLIP vision tower (neither the official Wan/open-clip "
                          f"'visual.patch_embedding.weight' nor transformers 'embeddings.patch_embedding.weight'); "
                          f"first keys: {keys[:8]}")


def _plan(layout: str, prefix: str, n_run: int):
    """List of ``(source key, [(our path, layer, fn)])`` for the tensors we keep."""
    def t(x):
        return x.T

    def ident(x):
        return x

    def patch(w):  # [dim, 3, p, p] -> [(py, px, c), dim]
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])

    def part(i, fn):
        return lambda x: fn(np.split(x, 3, axis=0)[i])

    plan = []
    if layout == "official":
        v = prefix
        plan += [(f"{v}patch_embedding.weight", [("patch_embedding/kernel", None, patch)]),
                 (f"{v}cls_embedding", [("cls_embedding", None, lambda x: x.reshape(-1))]),
                 (f"{v}pos_embedding", [("pos_embedding", None, lambda x: x.reshape(x.shape[-2], x.shape[-1]))]),
                 (f"{v}pre_norm.weight", [("pre_norm/scale", None, ident)]),
                 (f"{v}pre_norm.bias", [("pre_norm/bias", None, ident)])]
        for i in range(n_run):
            b = f"{v}transformer.{i}."
            plan += [(b + "norm1.weight", [("blocks/norm1/scale", i, ident)]),
                     (b + "norm1.bias", [("blocks/norm1/bias", i, ident)]),
                     (b + "attn.to_qkv.weight", [(f"blocks/attn/{n}/kernel", i, part(j, t))
                                                 for j, n in enumerate("qkv")]),
                     (b + "attn.to_qkv.bias", [(f"blocks/attn/{n}/bias", i, part(j, ident))
                                               for j, n in enumerate("qkv")]),
                     (b + "attn.proj.weight", [("blocks/attn/o/kernel", i, t)]),
                     (b + "attn.proj.bias", [("blocks/attn/o/bias", i, ident)]),
                     (b + "norm2.weight", [("blocks/norm2/scale", i, ident)]),
                     (b + "norm2.bias", [("blocks/norm2/bias", i, ident)]),
                     (b + "mlp.0.weight", [("blocks/mlp/fc1/kernel", i, t)]),
                     (b + "mlp.0.bias", [("blocks/mlp/fc1/bias", i, ident)]),
                     (b + "mlp.2.weight", [("blocks/mlp/fc2/kernel", i, t)]),
                     (b + "mlp.2.bias", [("blocks/mlp/fc2/bias", i, ident)])]
    else:
        v = prefix
        plan += [(f"{v}embeddings.patch_embedding.weight", [("patch_embedding/kernel", None, patch)]),
                 (f"{v}embeddings.class_embedding", [("cls_embedding", None, ident)]),
                 (f"{v}embeddings.position_embedding.weight", [("pos_embedding", None, ident)]),
                 (f"{v}pre_layrnorm.weight", [("pre_norm/scale", None, ident)]),
                 (f"{v}pre_layrnorm.bias", [("pre_norm/bias", None, ident)])]
        names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.q_proj": "attn/q",
                 "self_attn.k_proj": "attn/k", "self_attn.v_proj": "attn/v", "self_attn.out_proj": "attn/o",
                 "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
        for i in range(n_run):
            for theirs, ours in names.items():
                is_norm = ours.startswith("norm")
                plan += [(f"{v}encoder.layers.{i}.{theirs}.weight",
                          [(f"blocks/{ours}/{'scale' if is_norm else 'kernel'}", i, ident if is_norm else t)]),
                         (f"{v}encoder.layers.{i}.{theirs}.bias", [(f"blocks/{ours}/bias", i, ident)])]
    return plan


def _ignored(layout: str, prefix: str, last: int):
    if layout == "official":
        skip = (f"{prefix}transformer.{last}.", f"{prefix}post_norm.", f"{prefix}head", "textual.", "log_scale")
    else:
        skip = (f"{prefix}encoder.layers.{last}.", f"{prefix}post_layernorm.", "text_model.", "visual_projection.",
                "text_projection.", "logit_scale")
    return lambda k: k.startswith(skip) or k.endswith("position_ids")


def infer_config(src: TensorSource, layout: str, prefix: str, num_heads: int | None = None) -> dict:
    hf = (src.config or {}) if layout == "transformers" else {}
    hf = hf.get("vision_config", hf)  # a full CLIPModel config
    if layout == "official":
        block_re, patch_key, fc1 = rf"{re.escape(prefix)}transformer\.(\d+)\.", f"{prefix}patch_embedding.weight", \
            f"{prefix}transformer.0.mlp.0.weight"
        pos_shape = src.shape(f"{prefix}pos_embedding")
    else:
        block_re, patch_key, fc1 = rf"{re.escape(prefix)}encoder\.layers\.(\d+)\.", \
            f"{prefix}embeddings.patch_embedding.weight", f"{prefix}encoder.layers.0.mlp.fc1.weight"
        pos_shape = src.shape(f"{prefix}embeddings.position_embedding.weight")
    idx = {int(m.group(1)) for k in src.keys() if (m := re.match(block_re, k))}
    if not idx:
        raise ConversionError(f"{src.src}: no transformer blocks found")
    n_src = max(idx) + 1
    if n_src < 2:
        raise ConversionError(f"{src.src}: the tower has {n_src} block(s); Wan uses the penultimate block, so at "
                              f"least 2 are needed")
    if "num_hidden_layers" in hf and int(hf["num_hidden_layers"]) != n_src:
        raise ConversionError(f"{src.src}: config.json num_hidden_layers {hf['num_hidden_layers']} but the tensors "
                              f"have {n_src} blocks")
    pshape = src.shape(patch_key)
    if len(pshape) != 4 or pshape[1] != 3 or pshape[2] != pshape[3]:
        raise ConversionError(f"{src.src}: {patch_key} has shape {pshape}, expected [dim, 3, p, p]")
    dim, patch = pshape[0], pshape[2]
    n_pos = pos_shape[-2]
    grid = int(round(np.sqrt(n_pos - 1)))
    if grid * grid + 1 != n_pos:
        raise ConversionError(f"{src.src}: {n_pos} position embeddings is not 1 + a square grid")
    if fc1 not in src:
        raise ConversionError(f"{src.src}: missing key {fc1!r}")
    heads = num_heads or hf.get("num_attention_heads") or WAN_VIT_H_HEADS.get(dim)
    if heads is None:
        raise ConversionError(f"{src.src}: the head count of a width-{dim} tower is not in the tensors; "
                              f"pass --num_heads")
    act = hf.get("hidden_act", "gelu")
    act = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if act is None:
        raise ConversionError(f"{src.src}: unsupported hidden_act {hf.get('hidden_act')!r}")
    return dict(image_size=grid * patch, patch_size=patch, dim=dim, mlp_dim=src.shape(fc1)[0], num_heads=int(heads),
                num_layers=n_src - 1, source_layers=n_src, eps=float(hf.get("layer_norm_eps", 1e-5)),
                activation=act)


def convert(src_path: str, dtype: str = "auto", num_heads: int | None = None):
    """-> ``(config dict, flat params {path: np.ndarray})``."""
    from svi_jax.model_dirs import flatten
    from svi_jax.models.clip import CLIPConfig, param_shapes

    src = TensorSource(src_path)
    layout, prefix = detect_layout(src)
    cfg = infer_config(src, layout, prefix, num_heads)
    np_dtype = parse_dtype(dtype)
    if np_dtype is None:
        probe = f"{prefix}pre_norm.weight" if layout == "official" else f"{prefix}pre_layrnorm.weight"
        np_dtype = BF16 if src.is_half(probe) else np.dtype(np.float32)
    cfg["param_dtype"] = "bfloat16" if np_dtype == BF16 else np.dtype(np_dtype).name
    config = CLIPConfig.from_dict(cfg)
    spec = {k: (tuple(v.shape), np_dtype) for k, v in flatten(param_shapes(config)).items()}
    asm = Assembler(spec, f"{src_path} ({layout} CLIP layout)")
    plan = _plan(layout, prefix, config.num_layers)
    for key, targets in progress(plan, total=len(plan), desc=f"CLIP ({layout})"):
        if key not in src:
            raise ConversionError(f"cannot convert {src_path}: missing key {key!r}")
        value = src.get(key)
        if len(targets) > 1 and value.shape[0] != 3 * config.dim:  # fused q|k|v
            raise ConversionError(f"shape mismatch for source key {key!r}: expected first dim "
                                  f"{3 * config.dim} (q|k|v), got {tuple(value.shape)}")
        for dst, layer, fn in targets:
            asm.put(dst, fn(value), key, layer)
    arrays = asm.finish(src.keys(), ignore=_ignored(layout, prefix, config.num_layers))
    out_cfg = config.to_dict()
    out_cfg["source_layers"] = cfg["source_layers"]
    return out_cfg, arrays


def run(args) -> str:
    from svi_jax.model_dirs import save_model, unflatten

    config, arrays = convert(args.src, args.dtype, args.num_heads)
    out = save_model(args.dst, "clip", config, unflatten(arrays))
    n = sum(a.size for a in arrays.values())
    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
    print(f"CLIP vision tower: {config['num_layers']} of {config['source_layers']} blocks, {tokens} x "
          f"{config['dim']} tokens, {n / 1e6:.0f}M params ({config['param_dtype']}) -> {out}   "
          f"[peak RSS {peak_rss_mb():.0f} MB]")
    return out
