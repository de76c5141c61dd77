"""Model checkpoints on disk: ``DIR/config.json`` (kind + model config) and ``DIR/params`` (an orbax pytree).

Every converted model (DiT, VAE, UMT5, CLIP) is stored this way, and :func:`svi_jax.load` reads it back.
Parameters are checked against the shapes the model's config implies; any mismatch fails naming the key and
both shapes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from svi_jax.trees import flatten, path_str, unflatten  # noqa: F401 (API)

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint does not match what its config (or the caller) expects."""


def check_tree(expected, actual, what: str = "checkpoint", check_dtype: bool = False) -> None:
    """Fail with a clear message if ``actual`` lacks, adds or mis-shapes any leaf of ``expected``.

    ``expected`` may hold arrays or ``jax.ShapeDtypeStruct``s.
    """
    exp, act = flatten(expected), flatten(actual)
    missing = sorted(set(exp) - set(act))
    unexpected = sorted(set(act) - set(exp))
    problems = []
    if missing:
        problems += [f"missing key {k!r} (expected shape {tuple(exp[k].shape)})" for k in missing]
    if unexpected:
        problems += [f"unexpected key {k!r} (shape {tuple(np.shape(act[k]))})" for k in unexpected]
    for k in sorted(set(exp) & set(act)):
        es, as_ = tuple(exp[k].shape), tuple(np.shape(act[k]))
        if es != as_:
            problems.append(f"key {k!r}: expected shape {es}, got {as_}")
        elif check_dtype and np.dtype(exp[k].dtype) != np.dtype(act[k].dtype):
            problems.append(f"key {k!r}: expected dtype {exp[k].dtype}, got {act[k].dtype}")
    if problems:
        head = f"{what} does not match its config ({len(problems)} problem(s)):\n  "
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(head + "\n  ".join(shown))


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_model(directory: str, kind: str, config: Mapping[str, Any], params) -> str:
    """Write ``config.json`` and the params (orbax). Returns the absolute directory."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    params_dir = os.path.join(directory, "params")
    if os.path.exists(params_dir):
        import shutil

        shutil.rmtree(params_dir)
    ckptr = _checkpointer()
    ckptr.save(params_dir, params)
    ckptr.wait_until_finished()
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": dict(config)}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=_json_default)
    from svi_jax.integrity import write_checksums

    write_checksums(directory)   # sha256sums.json: verified by load_params
    return directory


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not an svi_jax model directory: no config.json "
                              f"(convert weights first with `python convert/from_torch.py ...`)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); convert the model again") from None
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise CheckpointError(f"{path} has no 'kind'/'config' entries; was it written by svi_jax?")
    return meta


def load_params(directory: str, expected, what: str | None = None):
    """Restore params and check them against ``expected`` (a tree of ShapeDtypeStructs or arrays)."""
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{directory}: no params/ directory")
    from svi_jax import integrity

    try:
        integrity.verify_checksums(os.path.abspath(directory))
    except integrity.IntegrityError as e:
        raise CheckpointError(f"{e}; convert the model again (python convert/from_torch.py ...)") from None
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        stored = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    except Exception as e:  # orbax/tensorstore: missing or damaged metadata
        raise CheckpointError(f"{params_dir}: unreadable checkpoint metadata ({_first_line(e)}); convert the model "
                              f"again") from None
    check_tree(expected, stored, what or f"checkpoint {directory}")
    # Restore in the stored dtypes; casting is the caller's choice.
    try:
        params = ckptr.restore(params_dir, stored)
    except Exception as e:  # tensorstore: truncated or damaged array files
        raise CheckpointError(f"{params_dir}: damaged checkpoint ({_first_line(e)}); convert the model again") from None
    try:
        integrity.check_tree_finite(params, what or f"checkpoint {directory}")
    except integrity.NonFiniteError as e:
        raise CheckpointError(str(e)) from None
    return params


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:limit] if text else type(e).__name__)


def load_model_dir(directory: str, kind: str, config_cls, shapes_fn, what: str, dtype=None, param_dtype=None,
                   **overrides):
    """``(config, params)`` of a model directory of ``kind``: the params checked against ``shapes_fn(config)``, kept
    in their stored dtype unless ``param_dtype`` is given; ``dtype`` (compute) and the non-``None`` ``overrides``
    replace config fields (a dataclass with ``from_dict``)."""
    import dataclasses

    import jax.numpy as jnp

    from svi_jax.models.layers import dtype_of

    meta = read_meta(directory)
    if meta["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {meta['kind']!r} model, not {kind!r}")
    cfg = config_cls.from_dict(meta["config"])
    params = load_params(directory, shapes_fn(cfg), what=f"{what} checkpoint {directory}")
    stored = jax.tree.leaves(params)[0].dtype
    over = {"param_dtype": jnp.dtype(dtype_of(param_dtype) if param_dtype is not None else stored).name}
    if dtype is not None:
        over["dtype"] = jnp.dtype(dtype_of(dtype)).name
    over.update({k: v for k, v in overrides.items() if v is not None})
    cfg = dataclasses.replace(cfg, **over)
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype_of(cfg.param_dtype)), params)
