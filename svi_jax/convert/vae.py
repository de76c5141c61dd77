"""Convert the Wan2.1 VAE to an svi_jax checkpoint.

Sources (auto-detected from the tensor names):
* the official ``Wan2.1_VAE.pth`` (``encoder.conv1.weight``, ``encoder.downsamples.N...``, ``conv1``/``conv2``),
  read with ``torch.load(weights_only=True, mmap=True)``;
* a diffusers ``AutoencoderKLWan`` directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a
  single safetensors/.pth file in that layout.

The architecture comes from ``--config`` (a diffusers or svi_jax VAE config.json), else from a ``config.json``
beside the source, else every dimension (base_dim, decoder_base_dim, z_dim, dim_mult, num_res_blocks,
temperal_downsample) is read from the tensor shapes (:func:`infer_arch`), with Wan2.1's latent statistics. Every key is
checked (missing, unexpected, mis-shaped -> one error naming each key and both shapes) before tensors are read.

    python convert/from_torch.py vae --src Wan2.1_VAE.pth --dst ckpt/vae
"""
from __future__ import annotations

import json
import re
import time

import numpy as np

from svi_jax.convert.common import BF16, ConversionError, TensorSource, parse_dtype, peak_rss_mb, progress

STRIP_PREFIXES = ("module.", "model.", "vae.")


# ------------------------------------------------------------------------------------------------ key maps

def _flat_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from svi_jax.model_dirs import flatten
    from svi_jax.models.vae import param_shapes

    return {k: tuple(v.shape) for k, v in flatten(param_shapes(cfg)).items()}


_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "upsamplers")


def diffusers_key(path: str) -> str:
    """Our param path -> diffusers ``AutoencoderKLWan`` state-dict key."""
    parts = path.split("/")
    out = []
    for p in parts[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        if m and m.group(1) in _LISTS:
            out += [m.group(1), m.group(2)]
        elif p == "resample":
            out += ["resample", "1"]
        else:
            out.append(p)
    out.append({"kernel": "weight", "scale": "gamma", "bias": "bias"}[parts[-1]])
    return ".".join(out)


def source_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of the tensor that becomes our param ``path`` of ``shape``."""
    leaf = path.rsplit("/", 1)[-1]
    in_attention = "/attentions_" in path
    if leaf == "bias":
        return shape
    if leaf == "scale":  # RMS_norm gamma: (C, 1, 1) for the attention's image norm, else (C, 1, 1, 1)
        return shape + ((1, 1) if in_attention else (1, 1, 1))
    if len(shape) == 5:  # causal conv [kt, kh, kw, I, O] <- [O, I, kt, kh, kw]
        kt, kh, kw, i, o = shape
        return (o, i, kt, kh, kw)
    if len(shape) == 4:  # conv2d [kh, kw, I, O] <- [O, I, kh, kw]
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 3:  # time conv [3, I, O] <- [O, I, 3, 1, 1]
        kt, i, o = shape
        return (o, i, kt, 1, 1)
    if len(shape) == 2:  # 1x1 conv as dense [I, O] <- [O, I, 1, 1] (attention) / [O, I, 1, 1, 1]
        i, o = shape
        return (o, i, 1, 1) if in_attention else (o, i, 1, 1, 1)
    raise AssertionError(path)


def to_ours(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch tensor (already checked to have ``source_shape``) -> our layout of ``shape``."""
    if len(shape) == 1:
        return value.reshape(shape)
    if len(shape) == 5:
        return np.transpose(value, (2, 3, 4, 1, 0))
    if len(shape) == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if len(shape) == 3:
        return np.transpose(value[:, :, :, 0, 0], (2, 1, 0))
    return value.reshape(value.shape[:2]).T


def to_torch(value: np.ndarray, path: str) -> np.ndarray:
    """Inverse of :func:`to_ours` (used to export / to test)."""
    shape = tuple(value.shape)
    src = source_shape(path, shape)
    if len(shape) == 1:
        return value.reshape(src)
    if len(shape) == 5:
        return np.transpose(value, (4, 3, 0, 1, 2))
    if len(shape) == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if len(shape) == 3:
        return np.transpose(value, (2, 1, 0)).reshape(src)
    return value.T.reshape(src)


def official_key_map(cfg) -> dict[str, str]:
    """diffusers key -> official ``Wan2.1_VAE.pth`` key, for every param of ``cfg``."""
    n_levels = len(cfg.dim_mult)
    # decoder: flat `upsamples` list = per up block (num_res_blocks+1) resnets, then a Resample if not last
    up_index = {}
    k = 0
    for b in range(n_levels):
        for r in range(cfg.num_res_blocks + 1):
            up_index[(b, r)] = k
            k += 1
        if b != n_levels - 1:
            up_index[(b, "up")] = k
            k += 1
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight",
              "conv1.bias": "residual.2.bias", "norm2.gamma": "residual.3.gamma",
              "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
              "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    out = {}
    for path in _flat_shapes(cfg):
        d = diffusers_key(path)
        o = None
        if d.startswith("quant_conv."):
            o = "conv1." + d.split(".", 1)[1]
        elif d.startswith("post_quant_conv."):
            o = "conv2." + d.split(".", 1)[1]
        else:
            side, rest = d.split(".", 1)  # encoder / decoder
            if rest.startswith("conv_in."):
                o = f"{side}.conv1.{rest[len('conv_in.'):]}"
            elif rest.startswith("norm_out."):
                o = f"{side}.head.0.{rest[len('norm_out.'):]}"
            elif rest.startswith("conv_out."):
                o = f"{side}.head.2.{rest[len('conv_out.'):]}"
            elif rest.startswith("mid_block."):
                m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
                kind, i, tail = m.group(1), int(m.group(2)), m.group(3)
                if kind == "resnets":
                    o = f"{side}.middle.{2 * i}.{resnet[tail]}"
                else:
                    o = f"{side}.middle.1.{tail}"
            elif rest.startswith("down_blocks."):
                m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
                i, tail = int(m.group(1)), m.group(2)
                o = f"{side}.downsamples.{i}.{resnet.get(tail, tail)}"
            elif rest.startswith("up_blocks."):
                m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", rest)
                b, kind, r, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
                if kind == "resnets":
                    o = f"{side}.upsamples.{up_index[(b, r)]}.{resnet[tail]}"
                else:
                    o = f"{side}.upsamples.{up_index[(b, 'up')]}.{tail}"
        if o is None:
            raise AssertionError(f"no official key for {d}")
        out[d] = o
    return out


# ------------------------------------------------------------------------------------------------ layout / config

def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) or k == "encoder.conv1.weight"
           for k in keys):
        return "official"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) or k == "encoder.conv_in.weight"
           for k in keys):
        return "diffusers"
    raise ConversionError("cannot tell the VAE layout: expected official Wan2.1 keys (encoder.conv1.weight, "
                          "encoder.downsamples.*) or diffusers AutoencoderKLWan keys (encoder.conv_in.weight, "
                          f"encoder.down_blocks.*); first keys: {keys[:5]}")


def infer_arch(src: TensorSource, layout: str) -> dict:
    """``base_dim``, ``decoder_base_dim``, ``z_dim``, ``dim_mult``, ``num_res_blocks``, ``temperal_downsample`` from
    the tensor shapes of an official (``encoder.downsamples.K``) or diffusers (``encoder.down_blocks.K``) VAE: the
    encoder's flat list holds ``num_res_blocks`` residual blocks per level with a resample between levels (a
    ``time_conv`` where that level also halves time)."""
    off = layout == "official"
    conv_in = "encoder.conv1.weight" if off else "encoder.conv_in.weight"
    post = "conv2.weight" if off else "post_quant_conv.weight"
    dec_in = "decoder.conv1.weight" if off else "decoder.conv_in.weight"
    prefix = "encoder.downsamples." if off else "encoder.down_blocks."
    res_out = "residual.6.weight" if off else "conv2.weight"
    for k in (conv_in, post, dec_in):
        if k not in src:
            raise ConversionError(f"{src.src}: missing key {k!r}; cannot infer the VAE architecture (pass --config)")
    base = src.shape(conv_in)[0]
    idx = sorted({int(m.group(1)) for k in src.keys() if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    levels, current, temporal = [], [], []
    for i in idx:
        if f"{prefix}{i}.resample.1.weight" in src:
            levels.append(current)
            current = []
            temporal.append(f"{prefix}{i}.time_conv.weight" in src)
        elif f"{prefix}{i}.{res_out}" in src:
            current.append(src.shape(f"{prefix}{i}.{res_out}")[0])
        else:
            raise ConversionError(f"{src.src}: {prefix}{i} is neither a residual block nor a resample; cannot infer "
                                  f"the VAE architecture (pass --config)")
    levels.append(current)
    nrb = {len(lv) for lv in levels}
    if len(nrb) != 1 or not levels[0]:
        raise ConversionError(f"{src.src}: the encoder levels hold {[len(lv) for lv in levels]} residual blocks; "
                              f"cannot infer num_res_blocks (pass --config)")
    mult = []
    for lv in levels:
        if lv[-1] % base:
            raise ConversionError(f"{src.src}: an encoder level is {lv[-1]} wide, not a multiple of base_dim {base}")
        mult.append(lv[-1] // base)
    dec = src.shape(dec_in)[0]
    dec_base = dec // mult[-1] if dec % mult[-1] == 0 else None
    if dec_base is None:
        raise ConversionError(f"{src.src}: {dec_in} is {dec} wide, not a multiple of dim_mult[-1] {mult[-1]}")
    return dict(base_dim=base, decoder_base_dim=None if dec_base == base else dec_base, z_dim=src.shape(post)[0],
                dim_mult=tuple(mult), num_res_blocks=nrb.pop(), temperal_downsample=tuple(temporal))


def resolve_config(src: TensorSource, layout: str, config: dict | str | None = None):
    """VAEConfig from ``config`` (dict or JSON path), a config.json beside the source, or Wan2.1 defaults."""
    from svi_jax.models.vae import VAEConfig, wan21_config

    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    if config is None:
        config = src.config
    if isinstance(config, dict) and "kind" in config and "config" in config:  # an svi_jax config.json
        config = config["config"]
    try:
        if config is not None:
            return VAEConfig.from_dict(config)
        # No config: every dimension read from the tensors (Wan2.1's latent statistics for z_dim 16).
        kw = infer_arch(src, layout)
        z = kw["z_dim"]
        if z != 16:
            raise ConversionError(f"the tensors give z_dim {z}: pass --config (or put a config.json beside the file) "
                                  f"with latents_mean/latents_std of {z} entries")
        return wan21_config(**kw)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"bad VAE config: {e}") from e


# ------------------------------------------------------------------------------------------------ conversion

def convert(src_path: str, config: dict | str | None = None, dtype=None, show_progress: bool = True):
    """Read a PyTorch VAE checkpoint -> ``(VAEConfig, params)`` (nested dict of numpy arrays) in ``dtype``
    (``None`` / ``"auto"``: bfloat16 for a half-precision source, else float32)."""
    from svi_jax.model_dirs import unflatten

    src = TensorSource(src_path, strip_prefixes=STRIP_PREFIXES)
    layout = detect_layout(src.keys())
    cfg = resolve_config(src, layout, config)
    shapes = _flat_shapes(cfg)
    dkeys = {p: diffusers_key(p) for p in shapes}
    if layout == "official":
        omap = official_key_map(cfg)
        skeys = {p: omap[d] for p, d in dkeys.items()}
    else:
        skeys = dkeys
    by_src = {s: p for p, s in skeys.items()}

    # Check every key and shape before reading any tensor.
    problems = []
    for p, s in skeys.items():
        want = source_shape(p, shapes[p])
        if s not in src:
            problems.append(f"missing key {s!r} (expected shape {want})")
        elif tuple(src.shape(s)) != want:
            problems.append(f"key {s!r}: expected shape {want}, got {tuple(src.shape(s))}")
    unexpected = [k for k in src.keys() if k not in by_src]
    problems += [f"unexpected key {k!r} (shape {tuple(src.shape(k))})" for k in unexpected]
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise ConversionError(f"cannot convert {src_path} ({layout} layout, config base_dim={cfg.base_dim} "
                              f"z_dim={cfg.z_dim} dim_mult={list(cfg.dim_mult)} "
                              f"num_res_blocks={cfg.num_res_blocks}):\n  " + "\n  ".join(shown))

    out_dtype = parse_dtype(dtype)
    if out_dtype is None:                        # auto: bf16 if the source is half precision (as the DiT converter)
        out_dtype = BF16 if src.is_half(skeys["encoder/conv_in/kernel"]) else np.dtype(np.float32)
    flat = {}
    keys = sorted(by_src)
    it = progress(keys, total=len(keys), desc="VAE") if show_progress else keys
    for s in it:
        p = by_src[s]
        flat[p] = np.ascontiguousarray(to_ours(src.get(s), shapes[p])).astype(out_dtype)
    return cfg, unflatten(flat), layout


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True,
                        help="Wan2.1_VAE.pth, or a diffusers AutoencoderKLWan directory / safetensors file")
    parser.add_argument("--dst", required=True, help="output directory (config.json + params/)")
    parser.add_argument("--config", default=None,
                        help="VAE config JSON (diffusers or svi_jax); default: config.json beside --src, "
                             "else Wan2.1")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16"],
                        help="stored param dtype: auto (bfloat16 for a half-precision source, else float32), "
                             "float32, bfloat16")


def run(args) -> None:
    from svi_jax.model_dirs import save_model

    t0 = time.time()
    cfg, params, layout = convert(args.src, config=args.config, dtype=args.dtype)
    dst = save_model(args.dst, "vae", cfg.arch_dict(), params)
    n = sum(int(np.prod(v.shape)) for v in _leaves(params))
    print(f"converted {layout} VAE {args.src} -> {dst}: {n / 1e6:.1f}M params, "
          f"{time.time() - t0:.1f}s, peak RSS {peak_rss_mb():.0f} MB")


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


__all__ = ["add_arguments", "run", "convert", "diffusers_key", "official_key_map", "source_shape",
           "to_ours", "to_torch", "detect_layout"]
