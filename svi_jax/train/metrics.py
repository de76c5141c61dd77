"""``WORKDIR/metrics.jsonl`` (a header row saying what the run is, then one row per step) and TensorBoard."""
from __future__ import annotations

import json
import os

import jax

METRICS_FILE = "metrics.jsonl"


def step_rows(workdir: str) -> list:
    """The per-step rows of ``WORKDIR/metrics.jsonl`` (the header row skipped); [] when there is no file."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def resolved_attention(config, mesh) -> str:
    """What ``config.model.attention`` runs as on ``mesh``'s devices (``auto``: the platform's fused kernel)."""
    from svi_jax.models.layers import resolve_attention

    return resolve_attention(config.model.attention, mesh.devices.flat[0].platform, mesh.devices.size)


def run_header(config, mesh) -> dict:
    """The first row of ``metrics.jsonl``: the attention ``auto`` resolved to, platform, mesh, remat policy."""
    return {"attention": resolved_attention(config, mesh), "attention_config": config.model.attention,
            "platform": mesh.devices.flat[0].platform, "mesh": {k: int(v) for k, v in dict(mesh.shape).items()},
            "remat_policy": config.model.get("remat_policy", "full"), "processes": jax.process_count()}


class MetricsLog:
    """The run's metrics from ``start_step`` on: ``metrics.jsonl`` keeps exactly the rows of steps <= the restored
    step (a resumed run rewrites the rest); a new run starts with the :func:`run_header` row (readers skip rows
    without ``step``). Multi-host: process 0 writes, the others write nothing."""

    def __init__(self, workdir: str, config, mesh, start_step: int):
        if jax.process_index() != 0:
            self.file, self.tb = open(os.devnull, "w"), None
            return
        path = os.path.join(workdir, METRICS_FILE)
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a killed run
                    if r.get("step", 0) <= start_step:
                        rows.append(line if line.endswith("\n") else line + "\n")
        if not rows:
            rows.append(json.dumps({"header": run_header(config, mesh)}) + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
        except ImportError:  # pragma: no cover
            self.tb = None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
