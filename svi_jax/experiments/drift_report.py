"""The drift experiment's outputs: ``results.json``, the plots, the frame strip and the markdown tables.

``results.json`` holds, per model and clip, the mean and the per-rollout values of every metric (keys below),
the paired differences of every model vs its plain LoRA (Shot models vs ``plain``, Film models vs ``film_plain``)
at clips 1, 10, 20 and the last with a bootstrap 95% interval, the training runs, the timings and the settings.
Rollouts are paired: every model starts from the same held-out picture with the same seed (the same noise), so
the differences are taken per rollout before averaging.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

# results.json key -> (key in svi_jax.eval.drift.per_clip, label, better: True = higher, False = lower, None = ~1)
METRICS = {
    "colour_shift": ("color_shift", "colour shift", False),
    "hist_dist": ("hist_dist", "histogram dist.", False),
    "sharpness_ratio": ("sharpness_ratio", "sharpness ratio", None),
    "psnr_gt": ("psnr", "PSNR vs GT (dB)", True),
    "ssim_gt": ("ssim", "SSIM vs GT", True),
    "flicker": ("boundary_flicker", "boundary flicker", False),
    "psnr_first_frame": ("psnr_first_frame", "PSNR first frame vs ref (dB)", True),
}
PLOTTED = ("colour_shift", "sharpness_ratio", "psnr_gt", "ssim_gt", "flicker")


def values(results: list, key: str) -> np.ndarray:
    """``[rollouts, clips]`` of one metric (NaN where undefined, e.g. flicker at clip 1)."""
    src = METRICS[key][0]
    n = min(len(r["clips"]) for r in results)
    return np.array([[np.nan if r["clips"][k].get(src) is None else r["clips"][k][src] for k in range(n)]
                     for r in results], np.float64)


def bootstrap_ci(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``diff`` (paired differences, one per rollout)."""
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _pairs(a: list, b: list) -> tuple[list, list]:
    key = lambda r: (r["case"], r["seed"])  # noqa: E731
    bi = {key(r): r for r in b}
    common = [r for r in a if key(r) in bi]
    return common, [bi[key(r)] for r in common]


def paired(rollouts: dict, marks: list, n_boot: int) -> dict:
    """{model: {metric: {clip: {mean, ci95, n}}}} of model - its plain LoRA, per rollout."""
    out = {}
    for name, res in rollouts.items():
        ref = "film_plain" if name.startswith("film_") else "plain"
        if name == ref or ref not in rollouts:
            continue
        a, b = _pairs(res, rollouts[ref])
        if not a:
            continue
        out[name] = {"vs": ref}
        for key in METRICS:
            va, vb = values(a, key), values(b, key)
            cells = {}
            for k in marks:
                if k <= va.shape[1]:
                    d = va[:, k - 1] - vb[:, k - 1]
                    lo, hi = bootstrap_ci(d, n_boot)
                    cells[str(k)] = {"mean": float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"),
                                     "ci95": [lo, hi], "n": int(np.isfinite(d).sum())}
            out[name][key] = cells
    return out


def _plot_drift(rollouts: dict, path: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.7 * len(PLOTTED), 3.3), squeeze=False)
    for ax, key in zip(axes[0], PLOTTED):
        for name, res in rollouts.items():
            v = values(res, key)
            mean, std = np.nanmean(v, 0), np.nanstd(v, 0)
            xs = np.arange(1, len(mean) + 1)
            ok = np.isfinite(mean)
            ax.plot(xs[ok], mean[ok], marker=".", label=name, lw=1.8 if "erft" in name else 1.0)
            ax.fill_between(xs[ok], (mean - std)[ok], (mean + std)[ok], alpha=0.12)
        ax.set_title(METRICS[key][1])
        ax.set_xlabel("clip")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_paired(pairs: dict, marks: list, path: str):
    import matplotlib.pyplot as plt

    keys = ("colour_shift", "psnr_gt", "ssim_gt")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 0.35 * max(4, len(pairs)) + 1.4),
                             squeeze=False)
    names = list(pairs)
    for ax, key in zip(axes[0], keys):
        for j, k in enumerate(marks):
            ys = np.arange(len(names)) + (j - (len(marks) - 1) / 2) * 0.18
            cells = [pairs[n][key].get(str(k), {}) for n in names]
            mean = np.array([c.get("mean", np.nan) for c in cells])
            lo = np.array([c.get("ci95", [np.nan, np.nan])[0] for c in cells])
            hi = np.array([c.get("ci95", [np.nan, np.nan])[1] for c in cells])
            ax.errorbar(mean, ys, xerr=[mean - lo, hi - mean], fmt="o", ms=3, capsize=2, label=f"clip {k}")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels([f"{n} - {pairs[n]['vs']}" for n in names], fontsize=7)
        ax.set_title(f"{METRICS[key][1]}: paired diff., 95% CI", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(run: dict) -> list:
    from svi_jax.train.metrics import step_rows

    return [r for r in step_rows(os.path.dirname(run["lora"])) if "loss" in r]


def _plot_training(runs: dict, path: str, window: int = 25) -> bool:
    """Each LoRA's training loss (moving mean over ``window`` steps) and, for the ERFT runs, how full the latent
    error banks are: does training run long enough for the banks to fill and the loss to flatten?"""
    import matplotlib.pyplot as plt

    curves = {name: _curves(r) for name, r in runs.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    for i, (name, rows) in enumerate(curves.items()):
        steps, loss = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
        w = max(1, min(window, len(loss)))
        axes[0][0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), label=name, color=f"C{i % 10}",
                        lw=1.8 if name in ("plain", "erft") else 0.9)
        fill = [r["bank_fill_latent"] for r in rows if "bank_fill_latent" in r]
        if fill:
            axes[0][1].plot(steps[-len(fill):], np.asarray(fill) * 100, label=name, color=f"C{i % 10}")
    axes[0][0].set(title=f"LoRA training loss (mean of {window} steps)", xlabel="step")
    axes[0][1].set(title="latent error banks filled (%)", xlabel="step", ylim=(0, 105))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def frame_strip(workdir: str, models: list, case: str, clip_frames: int, clips: list, path: str) -> bool:
    """A PNG grid: rows = ground truth + models, columns = the last frame of each clip in ``clips``."""
    from PIL import Image

    rows = []
    truth = None
    for name in models:
        f = os.path.join(workdir, "rollouts", f"{name}_{case}.npz")
        if not os.path.exists(f):
            continue
        data = np.load(f)
        frames = data["frames"]
        truth = data["truth"] if truth is None and "truth" in data.files else truth
        rows.append((name, frames))
    if not rows:
        return False
    if truth is not None:
        rows.insert(0, ("truth", truth))
    idx = [min(k * clip_frames, len(rows[-1][1]) - 1) for k in clips]
    grid = np.concatenate([np.concatenate([fr[min(i, len(fr) - 1)] for i in idx], 1) for _, fr in rows], 0)
    scale = 3
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("rows: " + ", ".join(n for n, _ in rows) + "; columns: last frame of clips "
                + ", ".join(str(k) for k in clips) + "\n")
    return True


def write(config, workdir: str, rollouts: dict, runs: dict, timings: dict, report_path: str | None,
          command: str, clip_frames: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    e = config.experiment
    n = e.num_clips
    marks = sorted({k for k in (1, 10, 20) if k <= n} | {n})
    summary = {name: {key: {"mean": np.nanmean(values(res, key), 0).tolist(),
                            "values": values(res, key).T.tolist()} for key in METRICS}
               for name, res in rollouts.items()}
    pairs = paired(rollouts, marks, int(e.bootstrap))
    settings = {"experiment": e.to_dict(), "model": config.model.to_dict(), "encoders": config.encoders.to_dict(),
                "lora": config.lora.to_dict(), "erft": config.erft.to_dict(), "data": config.data.to_dict()}
    results = {"models": summary, "paired_vs_plain": pairs, "runs": runs, "timings": timings, "settings": settings,
               "rollouts_per_model": {k: len(v) for k, v in rollouts.items()}, "command": command}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    _plot_drift(rollouts, os.path.join(workdir, "drift.png"))
    if pairs:
        _plot_paired(pairs, marks, os.path.join(workdir, "paired.png"))
    _plot_training(runs, os.path.join(workdir, "training.png"))
    strip_clips = sorted({k for k in (1, 10, 20) if k <= n})
    frame_strip(workdir, [m for m in ("base", "plain", "erft") if m in rollouts],
                heldout_first(config), clip_frames, strip_clips, os.path.join(workdir, "strip.png"))
    text = markdown(rollouts, summary, pairs, runs, timings, marks, command)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    if report_path:
        d = os.path.join(os.path.dirname(os.path.abspath(report_path)), "drift")
        os.makedirs(d, exist_ok=True)
        for name in ("drift.png", "paired.png", "training.png", "strip.png", "strip.txt", "results.json"):
            if os.path.exists(os.path.join(workdir, name)):
                shutil.copy(os.path.join(workdir, name), os.path.join(d, name))
        with open(os.path.join(d, "results.md"), "w") as f:
            f.write(text)
    return text


def heldout_first(config) -> str:
    return list(config.experiment.heldout_images)[0]


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def markdown(rollouts, summary, pairs, runs, timings, marks, command) -> str:
    nroll = len(next(iter(rollouts.values())))
    secs = {k: v for k, v in timings.items() if k != "passes"}
    passes = int(timings.get("passes", 1))
    lines = [f"Measured with `{command}`; {sum(secs.values()):.0f} s in all on this machine "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in secs.items())}"
             f"{f'; the sum over {passes} passes in one workdir' if passes > 1 else ''}); "
             f"{nroll} paired rollouts per model.", ""]
    for key, (_, label, higher) in METRICS.items():
        better = "higher" if higher else "lower" if higher is False else "closer to 1"
        lines += [f"**{label}** (`{key}`, {better} is better; mean ± std over rollouts)", "",
                  "| model | " + " | ".join(f"clip {k}" for k in marks) + " |", "|---|" + "---|" * len(marks)]
        for name in rollouts:
            v = np.asarray(summary[name][key]["values"], np.float64)   # [clips, rollouts]
            cells = []
            for k in marks:
                row = v[k - 1] if k - 1 < len(v) else np.array([np.nan])
                cells.append("n/a" if not np.isfinite(row).any() else
                             f"{np.nanmean(row):.3f} ± {np.nanstd(row):.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if pairs:
        lines += ["**Paired differences vs the plain LoRA** (model − plain per rollout; mean [bootstrap 95% CI])", ""]
        for key in ("colour_shift", "psnr_gt", "ssim_gt", "sharpness_ratio"):
            lines += [f"`{key}`", "", "| model | " + " | ".join(f"clip {k}" for k in marks) + " |",
                      "|---|" + "---|" * len(marks)]
            for name, p in pairs.items():
                cells = []
                for k in marks:
                    c = p[key].get(str(k))
                    cells.append("n/a" if not c else f"{_fmt(c['mean'])} [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}]")
                lines.append(f"| {name} − {p['vs']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Training (final loss = mean of the last 10% of steps):", "",
              "| run | steps | final loss | seconds |", "|---|---|---|---|"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r.get('end_step')} | {r.get('final_loss', float('nan')):.4f} | {r.get('seconds')} |")
    return "\n".join(lines) + "\n"
