"""The settings of a training run directory: kept, compared on resume, never overwritten.

The first run writes ``WORKDIR/config.json``; a resumed run whose settings differ writes ``config.1.json``,
``config.2.json``, ... beside it (the original is never replaced). Resuming compares the new settings with the latest
saved ones: any change of a field that decides what the run computes (seed, optimiser, data source and clip shape,
model, checkpoints, LoRA shape, ERFT, mesh, ...) is refused unless ``--config.train.allow_changes=FIELD[,FIELD...]``
names it (a name also covers the fields under it: ``optim`` covers ``optim.lr``). Fields that only steer the loop
(``train.num_steps``, ``ckpt_every``, ``keep``, ``max_nonfinite``, ``async_checkpoints``, ``export_lora``) and
data-loader threads may change freely.
"""
from __future__ import annotations

import json
import os
import re

from svi_jax.config_schema import MOVED

CONFIG_FILE = "config.json"

# fields that never change what a resumed run computes
FREE = ("name", "train.num_steps", "train.ckpt_every", "train.keep", "train.async_checkpoints",
        "train.max_nonfinite", "train.export_lora", "train.allow_changes", "data.num_workers", "data.prefetch",
        "lora.export_prefix", "sample")


class SettingsChanged(ValueError):
    """Resuming with settings that differ from the run directory's (the message names every field)."""


def flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def as_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _numbered(workdir: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(workdir):
        m = re.fullmatch(r"config(?:\.(\d+))?\.json", name)
        if m:
            out.append((int(m.group(1) or 0), os.path.join(workdir, name)))
    return sorted(out)


def latest_saved(workdir: str) -> tuple[str, dict] | None:
    """``(path, settings)`` of the newest config file of ``workdir`` (None if there is none)."""
    if not os.path.isdir(workdir):
        return None
    files = _numbered(workdir)
    if not files:
        return None
    path = files[-1][1]
    try:
        with open(path) as f:
            return path, json.load(f)
    except (OSError, ValueError) as e:
        raise SettingsChanged(f"{path} is unreadable ({e}); restore it from a copy or use a new --workdir") from None


def _allowed(field: str, allow: list[str]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow) or \
        any(field == f or field.startswith(f + ".") for f in FREE)


def changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """Fields whose value differs (fields absent from ``old``, e.g. added by an upgrade, are not changes; fields an
    upgrade moved, :data:`svi_jax.config_schema.MOVED`, are compared at their new place)."""
    a, b = {MOVED.get(k, k): v for k, v in flat(old).items()}, flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k in a and a.get(k) != b.get(k)]


def check_and_record(config, workdir: str, resuming: bool, write: bool = True) -> list[str]:
    """Refuse changed settings when ``resuming``; record the settings. Returns the changed fields accepted."""
    new = as_dict(config)
    saved = latest_saved(workdir)
    accepted: list[str] = []
    if saved is not None:
        path, old = saved
        diff = changes(old, new)
        allow = [a.strip() for a in str(config.train.get("allow_changes", "") or "").split(",") if a.strip()]
        refused = [(k, o, n) for k, o, n in diff if not _allowed(k, allow)]
        if resuming and refused:
            names = ",".join(k for k, _, _ in refused)
            shown = "; ".join(f"{k} was {o!r}, now {n!r}" for k, o, n in refused[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise SettingsChanged(
                f"{workdir} was trained with other settings ({os.path.basename(path)}): {shown}{more}. Resuming "
                f"with them would not continue the same run: use a new --workdir, or pass "
                f"--config.train.allow_changes={names} to accept the change")
        accepted = [k for k, _, _ in diff if k not in FREE and not any(k.startswith(f + ".") for f in FREE)]
        if not diff:
            return accepted
    if write:
        files = _numbered(workdir) if os.path.isdir(workdir) else []
        name = CONFIG_FILE if not files else f"config.{files[-1][0] + 1}.json"
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:   # atomic: a reader (another process, a killed run) never sees half
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    return accepted
