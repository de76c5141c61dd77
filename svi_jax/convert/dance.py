"""SVI-Dance / UniAnimate adapters: the LoRA + ``dwpose_embedding`` files <-> an svi_jax adapter directory.

Official files (both hold the Lightning module's trainable parameters, ``train_svi_dance.py`` L1390-1400):

* ``UniAnimate-Wan2.1-14B-Lora-12000.ckpt`` (``torch.load(weights_only=True)``): ``pipe.dit.blocks.N.<module>.
  lora_{A,B}.default.weight`` (rank 128) + ``dwpose_embedding.{0,2,..,12}.{weight,bias}``; UniAnimate's
  ``randomref_embedding_pose.*`` (not used by SVI-Dance, ``wave2_facts.md`` section 2) is skipped and reported.
* ``svi-dance.safetensors``: the same names.

Our adapter directory (``kind: dance_adapter``): ``{'lora': <svi_jax.lora tree>, 'dwpose_embedding': <params of
svi_jax.models.pose.PoseEmbedding>}`` (orbax) + ``config.json`` (rank, dim, layers, skipped keys).

  python convert/from_torch.py dance --src UniAnimate-Wan2.1-14B-Lora-12000.ckpt --dst ckpt/unianimate
  python convert/from_torch.py dance-to-torch --src runs/dance/adapter --dst svi-dance.safetensors  (or .ckpt)
"""
from __future__ import annotations

import os
import re

import numpy as np

from svi_jax.convert.common import ConversionError

LORA_PREFIX = "pipe.dit."
POSE_PREFIX = "dwpose_embedding."
#: UniAnimate modules SVI-Dance does not use (skipped, reported)
SKIPPED_PREFIXES = ("randomref_embedding_pose.",)
KIND = "dance_adapter"


# ------------------------------------------------------------------------------------------------ reading


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a ``.ckpt``/``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file as
    float32 numpy arrays (a Lightning ``{'state_dict': ...}`` wrapper is unwrapped)."""
    import torch

    if not os.path.isfile(path):
        raise ConversionError(f"adapter file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
        return out
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors of many kinds
        raise ConversionError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} holds a {type(sd).__name__}, not a dict of tensors")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.float().numpy()
    return out


def split_state_dict(sd: dict) -> tuple[dict, dict, list[str]]:
    """``(lora keys without 'pipe.dit.', dwpose_embedding keys without the prefix, skipped keys)``; anything else is
    an error naming the key."""
    lora, pose, skipped = {}, {}, []
    for k, v in sd.items():
        if k.startswith(POSE_PREFIX):
            pose[k[len(POSE_PREFIX):]] = v
        elif ".lora_" in k:
            lora[k[len(LORA_PREFIX):] if k.startswith(LORA_PREFIX) else k] = v
        elif k.startswith(SKIPPED_PREFIXES):
            skipped.append(k)
        else:
            raise ConversionError(f"unknown key {k!r} in the adapter file (expected 'pipe.dit.<module>.lora_A/B...', "
                                  f"'dwpose_embedding.N.weight/bias' or {SKIPPED_PREFIXES})")
    if not pose:
        raise ConversionError("no dwpose_embedding.* keys: this is not a UniAnimate / SVI-Dance adapter")
    if not lora:
        raise ConversionError("no LoRA keys ('pipe.dit.blocks.N.<module>.lora_A.default.weight')")
    return lora, pose, sorted(skipped)


# ------------------------------------------------------------------------------------------------ pose module


def pose_from_torch(pose_sd: dict, dim: int | None = None) -> dict:
    """``dwpose_embedding`` Sequential tensors -> our params (Conv3d ``[out, in, kt, kh, kw]`` -> ``[kt, kh, kw,
    in, out]``), strict: every layer present, shapes as the official module (``dim`` = the last conv's output)."""
    from svi_jax.models.pose import LAYERS, POSE_CHANNELS

    want_keys = {f"{i}.{n}" for i, *_ in LAYERS for n in ("weight", "bias")}
    extra, missing = sorted(set(pose_sd) - want_keys), sorted(want_keys - set(pose_sd))
    if extra:
        raise ConversionError(f"unexpected key(s) dwpose_embedding.{extra[0]} (the module has Conv3d layers "
                              f"{[i for i, *_ in LAYERS]})")
    if missing:
        raise ConversionError(f"missing key dwpose_embedding.{missing[0]}")
    if dim is None:
        dim = int(pose_sd[f"{LAYERS[-1][0]}.weight"].shape[0])
    out, cin = {}, 3
    for idx, cout, k, _, _ in LAYERS:
        cout = dim if cout is None else cout
        w, b = pose_sd[f"{idx}.weight"], pose_sd[f"{idx}.bias"]
        if tuple(w.shape) != (cout, cin) + tuple(k) or tuple(b.shape) != (cout,):
            raise ConversionError(f"dwpose_embedding.{idx}: weight {tuple(w.shape)} / bias {tuple(b.shape)}, "
                                  f"expected {(cout, cin) + tuple(k)} / {(cout,)}")
        out[str(idx)] = {"kernel": np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 4, 1, 0)),
                         "bias": np.asarray(b, np.float32)}
        cin = POSE_CHANNELS
    return out


def pose_to_torch(pose_params: dict) -> dict[str, np.ndarray]:
    out = {}
    for idx, p in pose_params.items():
        out[f"{POSE_PREFIX}{idx}.weight"] = np.ascontiguousarray(np.asarray(p["kernel"], np.float32)
                                                                 .transpose(4, 3, 0, 1, 2))
        out[f"{POSE_PREFIX}{idx}.bias"] = np.asarray(p["bias"], np.float32)
    return out


# ------------------------------------------------------------------------------------------------ LoRA


def _lora_kernel_shapes(lora_sd: dict) -> dict:
    """Kernel shapes the LoRA implies (``[L, in, out]`` per block module), for :func:`svi_jax.lora.from_state_dict`
    when no model is at hand."""
    import jax

    from svi_jax.model_dirs import unflatten

    mods: dict[str, dict] = {}
    for k, v in lora_sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", k)
        if not m:
            raise ConversionError(f"unknown LoRA key {k!r} (expected 'blocks.N.<module>.lora_A[.default].weight')")
        d = mods.setdefault(m.group(2).replace(".", "/"), {"layers": set()})
        d["layers"].add(int(m.group(1)))
        if m.group(3) == "A":
            d["in"] = v.shape[1]
        else:
            d["out"] = v.shape[0]
    flat = {}
    for path, d in mods.items():
        if "in" not in d or "out" not in d:
            raise ConversionError(f"LoRA module blocks.N.{path.replace('/', '.')} lacks lora_A or lora_B")
        flat[f"blocks/{path}/kernel"] = jax.ShapeDtypeStruct((max(d["layers"]) + 1, d["in"], d["out"]), np.float32)
    return unflatten(flat)


def lora_from_torch(lora_sd: dict, dit_params=None):
    """PEFT LoRA tensors -> our LoRA tree (checked against ``dit_params`` when given)."""
    from svi_jax import lora as lora_lib

    try:
        return lora_lib.from_state_dict(lora_sd, dit_params if dit_params is not None
                                        else _lora_kernel_shapes(lora_sd))
    except lora_lib.LoRAError as e:
        raise ConversionError(str(e)) from None


# ------------------------------------------------------------------------------------------------ adapter


def load_adapter(path: str, dit_params=None) -> tuple[dict, dict, dict]:
    """``(lora tree, pose params, info)`` from an official file (``.ckpt``/``.safetensors``) or our adapter dir."""
    import jax.numpy as jnp

    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        from svi_jax.model_dirs import read_meta

        meta = read_meta(path)
        if meta["kind"] != KIND:
            raise ConversionError(f"{path} holds a {meta['kind']!r} checkpoint, not a {KIND}")
        tree = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"))
        lora, pose = tree["lora"], tree["dwpose_embedding"]
        if dit_params is not None:   # the same strict checks as a file
            from svi_jax import lora as lora_lib

            lora = lora_from_torch(lora_lib.to_state_dict(lora), dit_params)
        info = dict(meta["config"])
    else:
        lora_sd, pose_sd, skipped = split_state_dict(read_state_dict(path))
        lora, pose = lora_from_torch(lora_sd, dit_params), pose_from_torch(pose_sd)
        info = {"skipped": skipped}
    import jax

    from svi_jax.lora import rank_of

    lora = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), lora)
    pose = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pose)
    info.update(rank=rank_of(lora), dim=int(pose["12"]["kernel"].shape[-1]),
                num_layers=int(jax.tree.leaves(lora)[0].shape[0]))
    return lora, pose, info


def save_adapter(directory: str, lora, pose, info: dict | None = None) -> str:
    from svi_jax.model_dirs import save_model

    return save_model(directory, KIND, dict(info or {}), {"lora": lora, "dwpose_embedding": pose})


def adapter_state_dict(lora, pose) -> dict[str, np.ndarray]:
    """Our LoRA + pose params -> the official names (``pipe.dit.`` LoRA + ``dwpose_embedding.``)."""
    from svi_jax import lora as lora_lib

    return {**lora_lib.to_state_dict(lora, prefix=LORA_PREFIX), **pose_to_torch(pose)}


def export_file(lora, pose, dst: str) -> dict:
    """Write the official layout: ``.safetensors`` (SVI-Dance) or ``.ckpt``/``.pt`` (``torch.save``, UniAnimate)."""
    import torch

    sd = adapter_state_dict(lora, pose)
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    if dst.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(sd, dst, metadata={"format": "pt", "writer": "svi_jax"})
    elif dst.endswith((".ckpt", ".pt", ".pth")):
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, dst)
    else:
        raise ConversionError(f"--dst must end with .safetensors, .ckpt, .pt or .pth, got {dst}")
    return {"tensors": len(sd), "file": dst}


def convert(src: str, dst: str) -> dict:
    lora, pose, info = load_adapter(src)
    save_adapter(dst, lora, pose, info)
    return info


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p):
    p.add_argument("--src", required=True, help="UniAnimate-Wan2.1-14B-Lora-12000.ckpt or an SVI-Dance .safetensors")
    p.add_argument("--dst", required=True, help="output adapter directory (config.json + orbax params)")


def run(args):
    info = convert(args.src, args.dst)
    skipped = f", skipped {len(info['skipped'])} unused key(s) ({info['skipped'][0]}, ...)" if info["skipped"] else ""
    print(f"converted dance adapter: LoRA rank {info['rank']} on {info['num_layers']} blocks + dwpose_embedding "
          f"(dim {info['dim']}){skipped} -> {args.dst}")
