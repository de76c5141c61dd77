"""Integrity of what is read back from disk: sha256 checksums of a directory's files and finiteness of arrays.

``write_checksums(DIR)`` writes ``DIR/sha256sums.json`` (``{"files": {relative path: sha256}}``) for every file
under ``DIR``; ``verify_checksums(DIR)`` recomputes them and fails naming the first file that is missing, added
with a different size, or changed. Every training checkpoint (``WORKDIR/checkpoints/STEP/``) and every converted
model directory carries one. ``check_finite`` fails naming the first key holding a NaN or an infinity.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

CHECKSUM_FILE = "sha256sums.json"
_CHUNK = 1 << 22


class IntegrityError(ValueError):
    """A file does not match its recorded checksum, or a loaded array holds non-finite values."""


class NonFiniteError(IntegrityError):
    """A loaded tensor holds NaN or infinite values; the message names the key."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != CHECKSUM_FILE:
                out.append(rel.replace(os.sep, "/"))
    return out


def write_checksums(directory: str) -> str:
    """Hash every file under ``directory`` into ``directory/sha256sums.json`` (written atomically)."""
    sums = {rel: sha256_file(os.path.join(directory, rel)) for rel in _files(directory)}
    path = os.path.join(directory, CHECKSUM_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": sums}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def has_checksums(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CHECKSUM_FILE))


def verify_checksums(directory: str, required: bool = False) -> bool:
    """Recompute the sums of ``directory``; raise :class:`IntegrityError` naming the file on any difference.

    Returns ``False`` (nothing checked) when the directory has no checksum file and ``required`` is false."""
    path = os.path.join(directory, CHECKSUM_FILE)
    if not os.path.isfile(path):
        if required:
            raise IntegrityError(f"{directory} has no {CHECKSUM_FILE}: its files cannot be verified")
        return False
    try:
        with open(path) as f:
            sums = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}); the directory cannot be verified") from None
    for rel, digest in sorted(sums.items()):
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            raise IntegrityError(f"{full} is missing (listed in {CHECKSUM_FILE})")
        if sha256_file(full) != digest:
            raise IntegrityError(f"{full} is corrupted: its sha256 differs from the one recorded when it was written")
    extra = sorted(set(_files(directory)) - set(sums))
    if extra:  # added later (a README, editor files): not read by the loaders, so not an error
        import logging

        logging.getLogger("svi_jax").warning("%s: %d file(s) not listed in %s (e.g. %s); they are not verified",
                                             directory, len(extra), CHECKSUM_FILE, extra[0])
    return True


def _is_float(a) -> bool:
    try:
        return np.issubdtype(np.dtype(a.dtype), np.inexact) or str(a.dtype) == "bfloat16"
    except TypeError:
        return str(getattr(a, "dtype", "")) in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def first_nonfinite(a) -> tuple[int, int] | None:
    """``(count of non-finite values, size)`` of a float array that has any, else ``None``."""
    if not _is_float(a):
        return None
    import jax

    if isinstance(a, jax.Array):  # counted on device: no host copy, works for arrays sharded over hosts
        import jax.numpy as jnp

        n = int(jnp.sum(~jnp.isfinite(a)))
        return (n, int(a.size)) if n else None
    x = np.asarray(a)
    if x.dtype.kind != "f" and x.dtype.kind != "c":
        x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    n = int(bad.sum())
    return (n, int(x.size)) if n else None


def check_finite(flat: Mapping[str, Any] | Iterable[tuple[str, Any]], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first key of ``flat`` (``{key: array}``) with NaN/inf values."""
    items = flat.items() if isinstance(flat, Mapping) else flat
    for key, value in items:
        res = first_nonfinite(value)
        if res is not None:
            raise NonFiniteError(f"{what}: key {key!r} holds {res[0]} non-finite (NaN/inf) value(s) of {res[1]}; "
                                 f"the file is damaged or was saved from a diverged run")


def check_tree_finite(tree, what: str) -> None:
    from svi_jax.trees import flatten

    check_finite(flatten(tree), what)
