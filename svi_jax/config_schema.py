"""The keys a config may hold, checked once at start-up by every command (right after the config is loaded).

A config (``configs/*.py``: ``base.train_config`` and the variants' sections) is a tree of sections. Each section
has a fixed set of keys: the model and encoder sections those of their dataclasses (``DiTConfig``, ``T5Config``,
``CLIPConfig``, ``Wav2Vec2Config``, the Wan ``VAEConfig`` or the patch codec's ``PatchVAEConfig``), the others the
tables below. :func:`check` refuses an unknown or misspelled key anywhere with one line naming it and the closest
known key, e.g.::

    config.erft.bank_szie: unknown key; did you mean config.erft.bank_size?

:func:`check_path` does the same for the key of a ``--config.a.b=value`` override before it is applied. Keys that
moved to another section (:data:`MOVED`) are refused with where they went. Both raise :class:`UnknownConfigKey`, a
:class:`svi_jax.errors.ConfigError`: the command prints the line and exits 2.

This module imports nothing of svi_jax but :mod:`svi_jax.errors` (and, inside functions, the model config
dataclasses); the keys of ``data`` and ``erft`` are listed here and kept equal to their defaults' by a test.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Iterable, Mapping

from svi_jax.errors import ConfigError


class UnknownConfigKey(ConfigError):
    """A config key that no section has (the message names it and the closest known key)."""


# the sections of every training config (configs/base.py), then those of the variants
TOP = ("name", "model", "checkpoints", "encoders", "data", "lora", "sample", "erft", "baseline", "optim", "train",
       "mesh", "sharding",
       "talk",          # configs/talk.py: SVI-Talk sampling and audio dropout
       "dance",         # configs/dance.py: SVI-Dance adapter and pose dropout
       "pro",           # configs/pro.py: SVI 2.0 Pro expert and chaining
       "experiment")    # configs/drift.py: the drift experiment's stages

DATA = ("num_frames", "height", "width", "frame_stride", "num_motion_frames", "p_motion", "pad_mode", "seed",
        "batch_size", "shuffle", "num_workers", "prefetch", "decode_threads", "seek", "max_retries",   # default_config
        "videos", "dataset", "cache", "synthetic",   # the data source (configs/base.py)
        "anchor")                                    # SVI 2.0 Pro: the anchor frame from outside the window

ERFT = ("p_noise", "p_latent", "p_image", "p_clean", "y_error_num", "error_modulate_factor", "num_grids", "shift",
        "capacity", "p_insert_clean", "warmup_steps", "warmup_gate", "grid_offset", "grid_steps", "y_error_start",
        "enabled", "bank_dtype", "bank_mode", "bank_replicas")   # erft.inject.DEFAULTS + the trainer's bank fields

SECTIONS: dict[str, Any] = {
    "": TOP,
    "checkpoints": ("dit", "vae", "t5", "clip", "tokenizer", "wav2vec2"),
    "encoders": ("dtype", "vae", "t5", "clip", "wav2vec2"),
    "data": DATA,
    "lora": ("rank", "alpha", "targets", "dtype", "export_prefix"),
    "sample": ("height", "width", "max_width", "cfg_scale", "fps"),
    "erft": ERFT,
    # the paper's Tab. 7 baseline: handcrafted degradations of the condition frames (svi_jax/augment.py)
    "baseline": ("handcrafted_p", "handcrafted_strength"),
    "optim": ("lr", "schedule", "weight_decay", "grad_clip", "b1", "b2", "eps"),
    "train": ("num_steps", "seed", "trainable", "ckpt_every", "keep", "max_nonfinite", "export_lora",
              "async_checkpoints", "allow_changes"),
    "mesh": ("data", "fsdp", "context", "tensor"),
    "sharding": ("rules",),
    "talk": ("fps", "cfg_text", "cfg_audio", "p_drop_audio"),
    "dance": ("adapter", "p_pose_zero", "p_image_zero"),
    "pro": ("expert", "boundary", "grid_steps", "overlap", "motion_latents", "p_first_clip"),
    "experiment": ("base", "heldout_images", "num_train_clips", "data_frames", "seed", "codec_clips", "base_steps",
                   "base_lr", "base_batch", "base_init", "base_pad_mode", "base_motion_frames", "base_p_motion",
                   "base_schedule", "lora_steps", "lora_lr", "num_clips", "seeds", "sample_steps",
                   "cfg_scale", "variants", "film_variants", "capacities", "strengths", "bootstrap"),
    # model and encoder sections: the fields of their config dataclasses (module, class)
    "model": ("svi_jax.models.dit", "DiTConfig"),
    "encoders.t5": ("svi_jax.models.t5", "T5Config"),
    "encoders.clip": ("svi_jax.models.clip", "CLIPConfig"),
    "encoders.wav2vec2": ("svi_jax.models.wav2vec2", "Wav2Vec2Config"),
    "encoders.vae": None,   # by its kind: see _vae_keys
}

#: keys that moved: old dotted path -> new one (refused with where they went; run_config maps saved runs)
MOVED = {
    "erft.handcrafted_p": "baseline.handcrafted_p",
    "erft.handcrafted_strength": "baseline.handcrafted_strength",
}

VAE_KINDS = {"wan": ("svi_jax.models.vae_config", "VAEConfig"), "patch": ("svi_jax.models.patch_vae", "PatchVAEConfig")}
MESH_AXES = ("data", "fsdp", "context", "tensor")   # svi_jax.sharding.MESH_AXES


def _fields(module: str, name: str) -> tuple[str, ...]:
    cls = getattr(importlib.import_module(module), name)
    return tuple(f.name for f in dataclasses.fields(cls))


def _is_section(v) -> bool:
    return isinstance(v, Mapping) or (hasattr(v, "items") and hasattr(v, "to_dict"))


def _vae_keys(node) -> tuple[str, ...]:
    kind = node.get("kind", "wan") if _is_section(node) else "wan"
    if kind not in VAE_KINDS:
        raise UnknownConfigKey(f"config.encoders.vae.kind: {kind!r} is not a codec; the kinds are "
                               f"{', '.join(VAE_KINDS)}")
    return ("kind",) + _fields(*VAE_KINDS[kind])


def known_keys(path: str, node=None) -> tuple[str, ...] | None:
    """The keys section ``path`` (dotted, '' = the top) may hold; None = not a section (any keys)."""
    if path not in SECTIONS:
        return None
    spec = SECTIONS[path]
    if path == "encoders.vae":
        return _vae_keys(node if node is not None else {})
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0].startswith("svi_jax."):
        return _fields(*spec)
    return tuple(spec)


def _dotted(path: str, key: str) -> str:
    return f"config.{path + '.' if path else ''}{key}"


def _everywhere() -> Iterable[tuple[str, str]]:
    """``(section, key)`` of every key the schema knows (dataclass sections included; the wan VAE's fields)."""
    for path in SECTIONS:
        for k in known_keys(path) or ():
            yield path, k


def suggestion(path: str, key: str, known: Iterable[str]) -> str:
    """The closest known key as ``config.a.b`` ('' if none is close): in the same section, else the same key in
    another section (``config.train.lr`` -> ``config.optim.lr``)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return _dotted(path, close[0])
    elsewhere = [(p, k) for p, k in _everywhere() if k == key and p != path]
    if not elsewhere:
        low = key.lower()
        elsewhere = [(p, k) for p, k in _everywhere() if p != path and
                     difflib.SequenceMatcher(None, low, k.lower()).ratio() >= 0.85]
    return _dotted(*elsewhere[0]) if elsewhere else ""


def unknown_key(path: str, key: str, known: Iterable[str]) -> UnknownConfigKey:
    full = f"{path}.{key}" if path else key
    if full in MOVED:
        return UnknownConfigKey(f"config.{full}: moved to config.{MOVED[full]} (set it there)")
    known = sorted(known)
    hint = suggestion(path, key, known)
    tail = f"did you mean {hint}?" if hint else f"the keys of {_dotted(path, '').rstrip('.')} are {', '.join(known)}"
    return UnknownConfigKey(f"{_dotted(path, key)}: unknown key; {tail}")


def _check_rules(rules) -> None:
    """``sharding.rules``: ``(logical name, None | mesh axis | (mesh axes...))`` pairs."""
    try:
        pairs = [(name, target) for name, target in rules]
    except (TypeError, ValueError):
        raise ConfigError("config.sharding.rules: expected (logical name, mesh axes) pairs") from None
    for name, target in pairs:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [a for a in axes if a not in MESH_AXES]
        if not isinstance(name, str) or bad:
            raise ConfigError(f"config.sharding.rules: ({name!r}, {target!r}) is not (logical name, mesh axes); "
                              f"the mesh axes are {', '.join(MESH_AXES)}")


def logical_rules(config):
    """``config.sharding.rules`` as the tuple ``svi_jax.sharding`` takes (``rules=``: tuples, not the lists of a
    JSON round trip); None where the config has no sharding section (the caller's default: ``LOGICAL_RULES``)."""
    rules = config.get("sharding", {}).get("rules") if hasattr(config, "get") else None
    if rules is None:
        return None
    _check_rules(rules)
    return tuple((str(n), t if t is None or isinstance(t, str) else tuple(t)) for n, t in rules)


def _walk(node, path: str) -> None:
    known = known_keys(path, node)
    if known is None:
        return
    for key in node.keys():
        if key not in known:
            raise unknown_key(path, key, known)
        child = f"{path}.{key}" if path else key
        value = node[key]
        if _is_section(value):
            _walk(value, child)
    if path == "sharding" and "rules" in node:
        _check_rules(node["rules"])


def check(config) -> None:
    """Refuse an unknown or moved key anywhere in ``config`` (a ConfigDict or dict) with one line."""
    _walk(config, "")


def check_path(config, dotted: str) -> None:
    """Refuse an override key ``a.b.c`` (``--config.a.b.c=value``) that is not a field of ``config``."""
    node, parts = config, dotted.split(".")
    for i, key in enumerate(parts):
        path = ".".join(parts[:i])
        if not _is_section(node):
            raise UnknownConfigKey(f"config.{path}: is a value, not a section (cannot set config.{dotted})")
        if key not in node:
            if key in (known_keys(path, node) or ()) and f"{path}.{key}".lstrip(".") not in MOVED:
                raise UnknownConfigKey(f"{_dotted(path, key)}: not a field of this config (other configs have it; "
                                       f"an override cannot add it)")
            raise unknown_key(path, key, list(node.keys()))
        node = node[key]


def field_paths(config, prefix: str = "config") -> list[tuple[str, Any]]:
    """Every leaf field of a config as ``(dotted name, value)``, in order."""
    out = []
    for k, v in config.items():
        name = f"{prefix}.{k}"
        out += field_paths(v, name) if _is_section(v) else [(name, v)]
    return out

