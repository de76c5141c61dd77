"""Functional LoRA over the DiT params pytree, and the SVI (PEFT-named safetensors) file format.

* LoRA weights are their own pytree, mirroring the params at each target ``Linear``:
  ``lora["blocks"]["self_attn"]["q"] = {"a": [L, in, r], "b": [L, r, out]}`` (leading ``L`` for scanned blocks).
  It is passed to the model as the ``lora`` variable collection; each targeted ``Linear`` then computes
  ``x W + s (x A) B`` with ``s = alpha / rank`` (``DiTConfig.lora_scale``), never materialising merged weights.
* Targets are chosen by a regex over ``/``-joined parameter paths of the kernels. The default is the official SVI
  target list ``q,k,v,o,ffn.0,ffn.2`` of self- and cross-attention (``k_img``/``v_img`` are not targets).
* Init as PEFT's ``init_lora_weights=True`` ("kaiming"): A kaiming-uniform(a=sqrt 5) -> U(-1/sqrt(in), 1/sqrt(in)),
  B zeros.
* File format (official SVI / PEFT): ``blocks.{i}.self_attn.q.lora_A.default.weight`` ``[r, in]`` and
  ``...lora_B.default.weight`` ``[out, r]``; read with or without a ``pipe.dit.`` / ``diffusion_model.`` prefix and
  with or without ``.default``. No alpha is stored. The official inference merge is ``W <- W + s * B @ A`` with
  ``s`` the LoRA strength (default 1.0), independent of alpha/rank; so :func:`save` folds the training scale
  ``alpha / rank`` into ``B`` (``scale=``): the exported file at strength 1 is exactly the model that was trained,
  for any alpha and rank (with ``r == alpha`` the scale is 1 and the file holds the raw weights).
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from svi_jax.model_dirs import flatten, unflatten

DEFAULT_TARGETS = r"(self_attn|cross_attn)/(q|k|v|o)/kernel$|ffn/(0|2)/kernel$"
_PREFIXES = ("pipe.dit.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")


class LoRAError(ValueError):
    """An SVI LoRA file does not fit the model (missing targets, unknown keys, mismatched ranks/shapes)."""


def target_paths(params, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Module paths (without ``/kernel``) whose kernel matches ``targets``."""
    rx = re.compile(targets)
    out = [k[: -len("/kernel")] for k in flatten(params) if k.endswith("/kernel") and rx.search(k)]
    if not out:
        raise LoRAError(f"the LoRA target regex {targets!r} matches no kernel of the model")
    return sorted(out)


def init_lora(params, key, rank: int = 128, targets: str = DEFAULT_TARGETS, dtype=jnp.float32):
    """PEFT-'kaiming' LoRA weights for every target kernel of ``params``."""
    flat = flatten(params)
    out = {}
    paths = target_paths(params, targets)
    keys = jax.random.split(key, len(paths))
    for k, path in zip(keys, paths):
        kernel = flat[path + "/kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        out[path + "/a"] = jax.random.uniform(k, (*lead, fan_in, rank), dtype, -bound, bound)
        out[path + "/b"] = jnp.zeros((*lead, rank, fan_out), dtype)
    return unflatten(out)


def lora_shapes(params, rank: int = 128, targets: str = DEFAULT_TARGETS, dtype=jnp.float32):
    return jax.eval_shape(lambda p: init_lora(p, jax.random.key(0), rank, targets, dtype), params)


def rank_of(lora) -> int:
    ranks = {int(v.shape[-1]) for k, v in flatten(lora).items() if k.endswith("/a")}
    if len(ranks) != 1:
        raise LoRAError(f"LoRA has mixed ranks {sorted(ranks)}")
    return ranks.pop()


def _delta(a, b):
    return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params, lora, scale: float = 1.0, sign: float = 1.0):
    """``W <- W + sign * scale * A @ B`` on every LoRA target (biases untouched). Returns new params."""
    flat, fl = dict(flatten(params)), flatten(lora)
    for path in {k.rsplit("/", 1)[0] for k in fl}:
        kname = path + "/kernel"
        if kname not in flat:
            raise LoRAError(f"LoRA target {path!r} is not a kernel of the model")
        w = flat[kname]
        d = _delta(fl[path + "/a"], fl[path + "/b"])
        if d.shape != w.shape:
            raise LoRAError(f"LoRA for {path!r} gives a {tuple(d.shape)} update, the kernel is {tuple(w.shape)}")
        flat[kname] = (w.astype(jnp.float32) + sign * scale * d).astype(w.dtype)
    return unflatten(flat)


def unmerge(params, lora, scale: float = 1.0):
    return merge(params, lora, scale, sign=-1.0)


# ------------------------------------------------------------------------------------ SVI / PEFT format


def _official_module(path: str, layer: int | None) -> str:
    parts = path.split("/")
    if parts[0] == "blocks":
        parts = ["blocks", str(layer)] + parts[1:]
    return ".".join(parts)


def to_state_dict(lora, prefix: str = "", scale: float = 1.0) -> dict[str, np.ndarray]:
    """Our LoRA tree -> PEFT-named arrays (``lora_A [r, in]``, ``lora_B [out, r]``), float32.

    ``scale`` (the training ``alpha / rank``) is folded into ``lora_B``, so ``W + B @ A`` is the trained model.
    """
    fl = flatten(lora)
    out = {}
    for path in sorted({k.rsplit("/", 1)[0] for k in fl}):
        a = np.asarray(fl[path + "/a"], np.float32)
        b = np.asarray(fl[path + "/b"], np.float32)
        if scale != 1.0:
            b = (b.astype(np.float64) * float(scale)).astype(np.float32)
        layers = range(a.shape[0]) if path.startswith("blocks/") else [None]
        for i in layers:
            name = prefix + _official_module(path, i)
            ai, bi = (a[i], b[i]) if i is not None else (a, b)
            out[f"{name}.lora_A.default.weight"] = np.ascontiguousarray(ai.T)
            out[f"{name}.lora_B.default.weight"] = np.ascontiguousarray(bi.T)
    return out


def save(lora, path: str, prefix: str = "", scale: float = 1.0) -> str:
    """Write an SVI-format LoRA ``.safetensors`` (float32), ``scale`` (training ``alpha / rank``) folded into B."""
    from safetensors.numpy import save_file

    save_file(to_state_dict(lora, prefix, scale), path, metadata={"format": "pt", "writer": "svi_jax"})
    return path


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    from svi_jax.integrity import first_nonfinite

    if not os.path.isfile(path):
        raise LoRAError(f"LoRA file {path} does not exist")
    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.float().numpy() if t.dtype.is_floating_point else t.numpy()
    except Exception as e:  # safetensors: truncated, not a safetensors file, damaged header
        text = str(e).strip().splitlines()
        raise LoRAError(f"LoRA file {path} is damaged or not a safetensors file "
                        f"({text[0][:160] if text else type(e).__name__}); export or download it again") from None
    for k, v in out.items():
        bad = first_nonfinite(v)
        if bad is not None:
            raise LoRAError(f"LoRA file {path}: key {k!r} holds {bad[0]} non-finite (NaN/inf) value(s) of {bad[1]}; "
                            f"the LoRA comes from a diverged run or is damaged")
    return out


def from_state_dict(sd: Mapping[str, np.ndarray], params, targets: str | None = None, dtype=jnp.float32):
    """PEFT-named LoRA arrays -> our LoRA tree for ``params`` (strict: every key used, shapes and ranks checked).

    With ``targets`` given, every matching kernel must have a LoRA (``missing target`` otherwise).
    """
    flat_params = flatten(params)
    mods: dict[str, dict[str, np.ndarray]] = {}
    for key, val in sd.items():
        k = key
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", k)
        if not m:
            raise LoRAError(f"unknown key {key!r} in LoRA file (expected '<module>.lora_A[.default].weight')")
        mods.setdefault(m.group(1), {})[m.group(2)] = np.asarray(val)
    ranks = set()
    per_path: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    for name, ab in sorted(mods.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"LoRA module {name!r} has only lora_{''.join(ab)}")
        bm = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if bm:
            layer, path = int(bm.group(1)), "blocks/" + bm.group(2).replace(".", "/")
        else:
            layer, path = None, name.replace(".", "/")
        kname = path + "/kernel"
        if kname not in flat_params:
            raise LoRAError(f"unknown key {name + '.lora_A'!r}: the model has no Linear {name!r}")
        w = flat_params[kname]
        fan_in, fan_out = w.shape[-2], w.shape[-1]
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != fan_in or B.shape[0] != fan_out or A.shape[0] != B.shape[1]:
            raise LoRAError(f"LoRA {name!r}: lora_A {A.shape} / lora_B {B.shape} do not fit kernel [{fan_out}, {fan_in}] "
                            f"(expected lora_A [r, {fan_in}] and lora_B [{fan_out}, r])")
        ranks.add(A.shape[0])
        if layer is not None and layer >= w.shape[0]:
            raise LoRAError(f"LoRA {name!r}: block {layer} does not exist (model has {w.shape[0]} blocks)")
        per_path.setdefault(path, {})[layer] = (A, B)
    if len(ranks) > 1:
        raise LoRAError(f"mismatched LoRA ranks in one file: {sorted(ranks)}")
    out = {}
    for path, layers in per_path.items():
        w = flat_params[path + "/kernel"]
        if path.startswith("blocks/"):
            missing = sorted(set(range(w.shape[0])) - set(layers))
            if missing:
                raise LoRAError(f"LoRA for {path!r} is missing blocks {missing}")
            A = np.stack([layers[i][0].T for i in range(w.shape[0])])
            B = np.stack([layers[i][1].T for i in range(w.shape[0])])
        else:
            A, B = layers[None][0].T, layers[None][1].T
        out[path + "/a"] = jnp.asarray(A, dtype)
        out[path + "/b"] = jnp.asarray(B, dtype)
    if targets is not None:
        missing_t = sorted(set(target_paths(params, targets)) - set(per_path))
        if missing_t:
            raise LoRAError(f"missing target(s) in LoRA file: {missing_t[:10]}")
    return unflatten(out)


def load(path: str, params, targets: str | None = None, dtype=jnp.float32):
    """Read an SVI-format LoRA file for ``params``."""
    return from_state_dict(_read_safetensors(path), params, targets, dtype)


def merge_file(params, path: str, scale: float = 1.0):
    """The official inference merge of an SVI LoRA file: ``W <- W + scale * B @ A``."""
    return merge(params, load(path, params), scale)
