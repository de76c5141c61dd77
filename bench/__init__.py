"""Benchmark suite: ``python -m bench [--only NAME] [--quick]`` (see ``docs/benchmarks.md``).

Shared helpers: interleaved timing (both sides of a ratio measured in the same loop, medians after warm-up), machine
information, and the row format every benchmark reports in the table.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    """This process's current resident set size in MB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call (``fn`` must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict:
    """Time several functions round-robin so machine load hits every side alike; the order rotates every round
    (``a b c, b c a, c a b, ...``) so that no function always runs first or always follows the same one.

    Returns ``{name: {"median", "min", "max", "spread", "times"}}`` (seconds; ``spread`` = (max - min) / median) and,
    under ``"_pairs"``, the per-round ratios of every name to the first one (their median is a second, noise-robust
    estimate of a ratio).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timed(fns[n]))
    out = {}
    for n, ts in times.items():
        med = statistics.median(ts)
        out[n] = {"median": med, "min": min(ts), "max": max(ts), "spread": (max(ts) - min(ts)) / med,
                  "times": [round(t, 4) for t in ts]}
    base = names[0]
    out["_pairs"] = {n: statistics.median(a / b for a, b in zip(times[n], times[base])) for n in names[1:]}
    return out


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> dict:
    return interleaved({"fn": fn}, reps, warmup)["fn"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import importlib

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for mod in ("jax", "jaxlib", "flax", "torch", "diffusers", "peft"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so in the table
            info[mod] = "not installed"
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        pass
    return info


def fmt_s(t: float) -> str:
    """Seconds for the table: ``2.31 s``, ``12.3 ms``, ``45 us``."""
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"


def row(benchmark: str, ours: str, reference: str, ratio: float | None, goal: str, passed: bool | None,
        why: str = "") -> dict:
    """One line of the results table. ``passed`` None = no goal / not measured."""
    return {"benchmark": benchmark, "ours": ours, "reference": reference,
            "ratio": None if ratio is None else round(float(ratio), 3), "goal": goal, "pass": passed, "why": why}
