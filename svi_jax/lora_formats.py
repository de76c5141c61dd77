"""LoRA files in the formats people share for Wan2.1, merged in order: ``W += s * scale * B @ A``.

One reader for every common layout (detected per key, so a file may mix them):

* **PEFT / SVI** (official SVI releases, our export): ``blocks.0.self_attn.q.lora_A.default.weight`` ``[r, in]`` and
  ``...lora_B...`` ``[out, r]``, with ``pipe.dit.`` / ``diffusion_model.`` / ``base_model.model.`` or no prefix.
* **ComfyUI / kohya** (e.g. LightX2V, Kijai's files): ``diffusion_model.blocks.0.self_attn.q.lora_down.weight``,
  ``.lora_up.weight``, optional ``.alpha`` (scale ``alpha / rank``, ComfyUI's ``calculate_weight``); kohya's
  ``lora_unet_blocks_0_self_attn_q`` spelling too.
* **diffusers** (``WanTransformer3DModel``): ``transformer.blocks.0.attn1.to_q.lora_A.weight``, ``attn2`` (cross),
  ``ffn.net.0.proj``, ``condition_embedder.*`` ... (mapped with :func:`svi_jax.convert.dit.diffusers_to_official`).
* **full-weight diffs** beside the LoRAs: ``<module>.diff`` (weight) and ``<module>.diff_b`` (bias), added as they
  are (norm scales, biases, modulation, ...).

Without ``.alpha`` the scale is 1 (the official SVI merge). A key that is not one of these, a module the model does
not have, a LoRA on a non-Linear, an ``A``/``B`` rank mismatch or a shape that does not fit is a :class:`LoRAError`
naming the key. Modules may differ in rank (as kohya files do); blocks a file leaves out get no update.

:func:`merge_stack` merges a list of ``(file, strength)`` in order, accumulating in float32 and casting once.
:func:`write` writes any of these files as ``svi`` / ``comfyui`` / ``diffusers`` (``lora-export``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from svi_jax.lora import LoRAError, _read_safetensors

_PREFIXES = ("pipe.dit.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "dit.")
_KOHYA = "lora_unet_"
# key suffix -> part
_SUFFIXES = (
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.diff$"), "diff"),
    (re.compile(r"\.diff_b$"), "diff_b"),
)
_DIFFUSERS_HINTS = (".attn1.", ".attn2.", ".to_q", ".to_k", ".to_v", ".to_out.", ".ffn.net.", "condition_embedder.",
                    "proj_out", ".add_k_proj", ".add_v_proj", ".norm_added_k")
FORMATS = ("svi", "comfyui", "diffusers")


@dataclasses.dataclass
class LoraSpec:
    """One entry of a LoRA stack: a file (or training workdir) and its strength ``s``."""

    path: str
    strength: float = 1.0

    def to_dict(self) -> dict:
        return {"path": self.path, "strength": float(self.strength)}


def parse_spec(text: str, default_strength: float = 1.0) -> LoraSpec:
    """``PATH[:STRENGTH]`` -> :class:`LoraSpec` (a suffix that is not a number stays part of the path)."""
    text = str(text).strip()
    if not text:
        raise LoRAError("empty --lora value")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraSpec(head, float(tail))
        except ValueError:
            pass
    return LoraSpec(text, float(default_strength))


def parse_specs(items, default_strength: float = 1.0) -> list[LoraSpec]:
    """``--lora`` values (a string, a list of strings / specs / ``{"path", "strength"}`` dicts) -> specs."""
    if items is None:
        return []
    if isinstance(items, (str, LoraSpec, dict)):
        items = [items]
    out = []
    for it in items:
        if isinstance(it, LoraSpec):
            out.append(it)
        elif isinstance(it, dict):
            out.append(LoraSpec(str(it["path"]), float(it.get("strength", default_strength))))
        else:
            out.append(parse_spec(it, default_strength))
    return out


# ------------------------------------------------------------------------------------------------ names


def official_to_diffusers(module: str) -> str:
    """Official Wan module name -> diffusers ``WanTransformer3DModel`` name (inverse of ``diffusers_to_official``)."""
    fixed = {"time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj",
             "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
             "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
             "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
             "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
             "head.head": "proj_out", "head.modulation": "scale_shift_table"}
    if module in fixed:
        return fixed[module]
    m = re.match(r"^(blocks\.\d+)\.(.+)$", module)
    if not m:
        return module
    blk, rest = m.groups()
    rest = re.sub(r"^self_attn\.", "attn1.", rest)
    rest = re.sub(r"^cross_attn\.", "attn2.", rest)
    rest = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table"}.get(
        rest, rest)
    rest = re.sub(r"^(attn[12])\.(q|k|v)$", r"\1.to_\2", rest)
    rest = re.sub(r"^(attn[12])\.o$", r"\1.to_out.0", rest)
    rest = re.sub(r"^attn2\.k_img$", "attn2.add_k_proj", rest)
    rest = re.sub(r"^attn2\.v_img$", "attn2.add_v_proj", rest)
    rest = re.sub(r"^attn2\.norm_k_img$", "attn2.norm_added_k", rest)
    return f"{blk}.{rest}"


def _diffusers_module_to_official(module: str) -> str:
    from svi_jax.convert.dit import diffusers_to_official

    fixed = {"proj_out": "head.head", "scale_shift_table": "head.modulation"}
    if module in fixed:
        return fixed[module]
    if module.endswith(".scale_shift_table"):
        return module[: -len("scale_shift_table")] + "modulation"
    return diffusers_to_official(module + ".weight")[: -len(".weight")]


def is_diffusers(keys: Iterable[str]) -> bool:
    """Whether a file uses diffusers module names (decided for the whole file: ``norm2`` means Wan's ``norm3``)."""
    return any(k.startswith("transformer.") or any(h in "." + k for h in _DIFFUSERS_HINTS) for k in keys)


def split_key(key: str, diffusers: bool = False) -> tuple[str, str]:
    """A file's key -> ``(official module name, part)``, part in down/up/alpha/diff/diff_b (kohya names keep
    their underscores; :class:`ModuleTable` resolves them). Unknown suffix -> :class:`LoRAError`."""
    k = key
    for p in _PREFIXES:
        if k.startswith(p):
            k = k[len(p):]
            break
    for rx, part in _SUFFIXES:
        m = rx.search(k)
        if m:
            module = k[: m.start()]
            break
    else:
        raise LoRAError(f"unknown key {key!r} in LoRA file (expected <module>.lora_A/lora_B[.default].weight, "
                        f".lora_down/.lora_up.weight, .alpha, .diff or .diff_b)")
    if diffusers and not module.startswith(_KOHYA):
        module = _diffusers_module_to_official(module)
    return module, part


class ModuleTable:
    """Official parameter names of a DiT params tree -> ``(our flat path, block index or None, layout)``."""

    def __init__(self, params):
        from svi_jax.model_dirs import flatten
        from svi_jax.convert.dit import official_key

        self.flat = dict(flatten(params))
        self.keys: dict[str, tuple[str, Optional[int], str]] = {}
        for path, v in self.flat.items():
            layers = range(v.shape[0]) if path.startswith("blocks/") else [None]
            for i in layers:
                key, how = official_key(path, i)
                self.keys[key] = (path, i, how)
        self.kohya = {}
        for key in self.keys:
            mod = key[: -len(".weight")] if key.endswith(".weight") else key
            self.kohya[_KOHYA + mod.replace(".", "_")] = mod

    def module(self, name: str, key: str) -> str:
        if name.startswith(_KOHYA):
            if name not in self.kohya:
                raise LoRAError(f"unknown key {key!r}: the model has no module {name[len(_KOHYA):]!r}")
            return self.kohya[name]
        return name

    def weight(self, module: str, key: str, bias: bool = False):
        cands = [module + (".bias" if bias else ".weight")] + ([] if bias else [module])
        for c in cands:
            if c in self.keys:
                return self.keys[c]
        raise LoRAError(f"unknown key {key!r}: the model has no {'bias' if bias else 'parameter'} "
                        f"{cands[0]!r} (a target the model lacks)")

    def shape(self, entry) -> tuple:
        path, i, _ = entry
        s = self.flat[path].shape
        return tuple(s[1:] if i is not None else s)


def group(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """``{module: {part: (key, array)}}`` of a state dict (official module names; kohya names unresolved)."""
    out: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    diffusers = is_diffusers(sd.keys())
    for key, val in sd.items():
        module, part = split_key(key, diffusers)
        slot = out.setdefault(module, {})
        if part in slot:
            raise LoRAError(f"LoRA file has two keys for {module!r} {part}: {slot[part][0]!r} and {key!r}")
        slot[part] = (key, np.asarray(val))
    return out


@dataclasses.dataclass
class Update:
    """One change to one parameter (``layer`` of a scanned block): ``lora`` (down ``[r, in]``, up ``[out, r]``,
    scale) or ``diff`` (an array in our layout)."""

    path: str
    layer: Optional[int]
    kind: str
    key: str
    down: Optional[np.ndarray] = None
    up: Optional[np.ndarray] = None
    scale: float = 1.0
    diff: Optional[np.ndarray] = None


def updates(sd: Mapping[str, np.ndarray], params, table: Optional[ModuleTable] = None) -> list[Update]:
    """Every update a LoRA state dict makes to ``params`` (strict: each key used once, shapes checked)."""
    from svi_jax.convert.dit import to_ours

    table = table or ModuleTable(params)
    out: list[Update] = []
    for name, parts in sorted(group(sd).items()):
        module = table.module(name, next(iter(parts.values()))[0])
        has_lora = "down" in parts or "up" in parts
        if has_lora:
            if "down" not in parts or "up" not in parts:
                have, miss = ("down", "up") if "down" in parts else ("up", "down")
                raise LoRAError(f"LoRA key {parts[have][0]!r} has no matching {miss} (lora_{'B' if miss == 'up' else 'A'}"
                                f" / lora_{miss}) weight")
            (kd, down), (ku, up) = parts["down"], parts["up"]
            entry = table.weight(module, kd)
            path, layer, how = entry
            if how != "linear":
                raise LoRAError(f"LoRA key {kd!r} targets {module!r}, which is not a Linear layer")
            fan_in, fan_out = table.shape(entry)
            if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
                raise LoRAError(f"rank mismatch in {kd!r} {tuple(down.shape)} / {ku!r} {tuple(up.shape)} "
                                f"(expected [r, in] and [out, r])")
            if down.shape[1] != fan_in or up.shape[0] != fan_out:
                raise LoRAError(f"LoRA {kd!r} {tuple(down.shape)} / {ku!r} {tuple(up.shape)} do not fit {module!r} "
                                f"[{fan_out}, {fan_in}] (expected [r, {fan_in}] and [{fan_out}, r])")
            scale = 1.0
            if "alpha" in parts:
                scale = float(np.asarray(parts["alpha"][1]).reshape(-1)[0]) / down.shape[0]
            out.append(Update(path, layer, "lora", kd, down=down, up=up, scale=scale))
        elif "alpha" in parts:
            raise LoRAError(f"LoRA key {parts['alpha'][0]!r} has no lora_down/lora_up weights")
        for part, bias in (("diff", False), ("diff_b", True)):
            if part not in parts:
                continue
            key, d = parts[part]
            entry = table.weight(module, key, bias=bias)
            want = table.shape(entry)
            d_ours = to_ours(d, entry[2]) if d.ndim == len(want) else d
            if tuple(d_ours.shape) != want:
                raise LoRAError(f"full-weight diff {key!r} has shape {tuple(d.shape)}; {module!r} needs "
                                f"{tuple(want)} (in our layout)")
            out.append(Update(entry[0], entry[1], "diff", key, diff=np.asarray(d_ours, np.float32)))
    if not out:
        raise LoRAError("the LoRA file holds no LoRA weights")
    return out


# ------------------------------------------------------------------------------------------------ merge


def read(path: str) -> dict[str, np.ndarray]:
    """A LoRA ``.safetensors`` file (or a training workdir's ``lora.safetensors``) as float32 arrays."""
    if os.path.isdir(path):
        cand = os.path.join(path, "lora.safetensors")
        if not os.path.isfile(cand):
            raise LoRAError(f"{path} is a directory without lora.safetensors")
        path = cand
    return _read_safetensors(path)


def deltas(params, stack: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict:
    """``{flat path: float32 delta}`` of a stack of ``(state dict, strength)`` (the sum, in order)."""
    import jax.numpy as jnp

    table = ModuleTable(params)
    acc: dict[str, object] = {}
    for sd, strength in stack:
        for u in updates(sd, params, table):
            w = table.flat[u.path]
            if u.kind == "lora":
                d = jnp.einsum("ri,or->io", jnp.asarray(u.down, jnp.float32),
                               jnp.asarray(u.up, jnp.float32) * jnp.float32(u.scale * strength))
            else:
                d = jnp.asarray(u.diff, jnp.float32) * jnp.float32(strength)
            if u.layer is not None:
                full = acc.get(u.path)
                if full is None:
                    full = jnp.zeros(w.shape, jnp.float32)
                acc[u.path] = full.at[u.layer].add(d)
            else:
                acc[u.path] = acc.get(u.path, 0.0) + d
    return acc


def merge_stack(params, stack: Iterable, default_strength: float = 1.0):
    """``params`` with every LoRA of ``stack`` merged in order, ``W += s_i * scale_i * B_i @ A_i`` (+ diffs).

    ``stack``: :class:`LoraSpec` / ``PATH[:S]`` strings, or ``(state dict, strength)`` pairs."""
    import jax.numpy as jnp

    from svi_jax.model_dirs import flatten, unflatten

    pairs = []
    for it in stack:
        if isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], Mapping):
            pairs.append(it)
        else:
            spec = parse_specs(it, default_strength)[0]
            pairs.append((read(spec.path), spec.strength))
    if not pairs:
        return params
    acc = deltas(params, pairs)
    flat = dict(flatten(params))
    for path, d in acc.items():
        w = flat[path]
        flat[path] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
    return unflatten(flat)


# ------------------------------------------------------------------------------------------------ export


def write(sd: Mapping[str, np.ndarray], dst: str, fmt: str = "svi") -> dict[str, np.ndarray]:
    """Rewrite a LoRA state dict (any readable layout) as ``svi`` (PEFT, ``lora_A.default``, no prefix: the
    training export), ``comfyui`` (``diffusion_model.`` + ``lora_down/lora_up`` + ``.alpha`` = rank, the kohya
    convention ComfyUI's loader maps for Wan) or ``diffusers`` (``transformer.`` + diffusers module names +
    ``lora_A/lora_B``); diffs keep ``.diff`` / ``.diff_b``. Any ``.alpha`` of the source is folded into the up
    weights for the alpha-less formats, so every format merges to the same weights."""
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise LoRAError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    out: dict[str, np.ndarray] = {}
    for module, parts in sorted(group(sd).items()):
        if module.startswith(_KOHYA):
            raise LoRAError(f"kohya-style key {next(iter(parts.values()))[0]!r}: export needs dotted module names "
                            f"(load it for sampling instead)")
        name = {"svi": module, "comfyui": "diffusion_model." + module,
                "diffusers": "transformer." + official_to_diffusers(module)}[fmt]
        if "down" in parts and "up" in parts:
            down = np.asarray(parts["down"][1], np.float32)
            up = np.asarray(parts["up"][1], np.float32)
            scale = float(np.asarray(parts["alpha"][1]).reshape(-1)[0]) / down.shape[0] if "alpha" in parts else 1.0
            if scale != 1.0:
                up = (up.astype(np.float64) * scale).astype(np.float32)
            if fmt == "svi":
                out[f"{name}.lora_A.default.weight"], out[f"{name}.lora_B.default.weight"] = down, up
            elif fmt == "comfyui":
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
                out[f"{name}.alpha"] = np.asarray(float(down.shape[0]), np.float32)
            else:
                out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        elif "down" in parts or "up" in parts or "alpha" in parts:
            raise LoRAError(f"LoRA module {module!r} is incomplete (has {sorted(parts)})")
        for part in ("diff", "diff_b"):
            if part in parts:
                out[f"{name}.{part}"] = np.ascontiguousarray(np.asarray(parts[part][1], np.float32))
    out = {k: np.require(v, requirements="C") for k, v in out.items()}
    save_file(out, dst, metadata={"format": "pt", "writer": "svi_jax", "lora_format": fmt})
    return out
