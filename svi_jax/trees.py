"""Pytrees as flat ``{'a/b/c': leaf}`` dicts (checkpoints, LoRA files, sharding specs); no svi_jax imports."""
from __future__ import annotations

from typing import Any, Mapping

import jax


def path_str(path) -> str:
    """'blocks/self_attn/q/kernel' for a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree) -> dict[str, Any]:
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
