"""Drift metrics per clip of a long (chained) video.

  python -m svi_jax.eval.drift --video out.mp4 --reference ref.png --out DIR [--clip_frames 80] [--ground_truth gt.mp4]

Per clip k (frames of the stitched video that clip k contributed):

* ``color_shift``: L2 norm of the per-channel mean difference vs the reference image (pixels in [0, 1]);
  ``color_shift_rgb`` the signed per-channel differences;
* ``hist_dist``: per-channel 32-bin histogram distance vs the reference (total variation, 0 = same, 1 = disjoint);
* ``sharpness_ratio``: variance of the Laplacian of the grey image / that of the reference (1 = as sharp);
* ``psnr`` / ``ssim`` vs the ground-truth continuation, frame by frame, when one is given;
* ``psnr_first_frame``: PSNR of the clip's first frame vs the reference image (at clip 1: how well the model keeps
  the picture it was given);
* ``boundary_flicker``: mean |frame difference| across the boundary into clip k, divided by the mean |frame
  difference| inside the clips (1 = a boundary is as smooth as any other step; > 1 = a visible jump).

Writes ``drift.json`` and ``drift.png`` (one panel per metric) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

METRICS = ("color_shift", "hist_dist", "sharpness_ratio", "psnr", "ssim", "psnr_first_frame", "boundary_flicker")


def _f(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def color_shift(frames, reference) -> tuple[float, list[float]]:
    d = _f(frames).reshape(-1, 3).mean(0) - _f(reference).reshape(-1, 3).mean(0)
    return float(np.linalg.norm(d)), [float(v) for v in d]


def hist_dist(frames, reference, bins: int = 32) -> float:
    a, b = _f(frames), _f(reference)
    out = []
    for c in range(3):
        ha, _ = np.histogram(a[..., c], bins=bins, range=(0.0, 1.0))
        hb, _ = np.histogram(b[..., c], bins=bins, range=(0.0, 1.0))
        out.append(0.5 * np.abs(ha / max(ha.sum(), 1) - hb / max(hb.sum(), 1)).sum())
    return float(np.mean(out))


def _lap_var(img) -> float:
    from scipy import ndimage

    grey = _f(img) @ np.array([0.299, 0.587, 0.114])
    return float(ndimage.laplace(grey).var())


def sharpness_ratio(frames, reference) -> float:
    ref = _lap_var(reference)
    return float(np.mean([_lap_var(f) for f in frames]) / max(ref, 1e-12))


def psnr_ssim(frames, truth) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = _f(frames), _f(truth)
    n = min(len(a), len(b))
    ps, ss = [], []
    for i in range(n):
        ps.append(peak_signal_noise_ratio(b[i], a[i], data_range=1.0))
        win = min(7, *a.shape[1:3]) // 2 * 2 + 1 if min(a.shape[1:3]) >= 3 else 3
        ss.append(structural_similarity(b[i], a[i], data_range=1.0, channel_axis=-1, win_size=win))
    ps = [p if np.isfinite(p) else 100.0 for p in ps]
    return float(np.mean(ps)), float(np.mean(ss))


def psnr(a, b) -> float:
    """PSNR in dB of two images (uint8 or float in [0, 1]); 100 for identical ones."""
    mse = float(np.mean((_f(a) - _f(b)) ** 2))
    return 100.0 if mse <= 1e-10 else float(10 * np.log10(1.0 / mse))


def match_size(reference, shape: tuple) -> tuple[np.ndarray, bool]:
    """``reference`` resized (PIL Lanczos) to the frames' ``(H, W)`` when it differs; ``(image, resized?)``."""
    ref = np.asarray(reference)
    if ref.shape[:2] == tuple(shape[:2]):
        return ref, False
    from PIL import Image

    u8 = ref if ref.dtype == np.uint8 else np.clip(np.rint(_f(ref) * 255), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((shape[1], shape[0]), Image.LANCZOS)), True


def clip_bounds(num_frames: int, clip_frames: int, first_clip_frames: int | None = None) -> list[tuple[int, int]]:
    """Frame ranges of each clip in a stitched video. The first clip may differ in length; a tail shorter than a
    clip (the final clip keeps its last ``m`` overlap frames) belongs to the last clip."""
    first = first_clip_frames or clip_frames
    bounds, s = [], 0
    e = min(first, num_frames)
    while s < num_frames:
        bounds.append((s, e))
        s, e = e, min(e + clip_frames, num_frames)
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < clip_frames:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def per_clip(video, reference, clip_frames: int, truth=None, first_clip_frames: int | None = None) -> dict:
    """Every metric per clip; ``video`` uint8 or float ``[T, H, W, 3]``."""
    v = _f(video)
    reference, _ = match_size(reference, v.shape[1:3])
    bounds = clip_bounds(len(v), clip_frames, first_clip_frames)
    steps = np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3)) if len(v) > 1 else np.zeros(0)
    boundary_idx = {s - 1 for s, _ in bounds[1:]}           # step from the last frame of clip k-1 into clip k
    inside = np.array([d for i, d in enumerate(steps) if i not in boundary_idx])
    base = float(inside.mean()) if inside.size else 1.0
    rows = []
    for k, (s, e) in enumerate(bounds):
        frames = v[s:e]
        cs, rgb = color_shift(frames, reference)
        row = {"clip": k, "start": s, "end": e, "color_shift": cs, "color_shift_rgb": rgb,
               "hist_dist": hist_dist(frames, reference), "sharpness_ratio": sharpness_ratio(frames, reference),
               "psnr_first_frame": psnr(frames[0], reference),
               "boundary_flicker": float(steps[s - 1] / max(base, 1e-12)) if k > 0 else None}
        if truth is not None and s < len(truth):
            row["psnr"], row["ssim"] = psnr_ssim(frames, _f(truth)[s:e])
        rows.append(row)
    return {"num_frames": int(len(v)), "clip_frames": clip_frames, "clips": rows}


def plot(results: dict | Sequence[tuple[str, dict]], path: str, metrics: Sequence[str] = METRICS, title: str = ""):
    """One panel per metric vs clip index; ``results`` one result or ``[(label, result), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("video", results)] if isinstance(results, dict) else list(results)
    metrics = [m for m in metrics if any(r["clips"] and r["clips"][-1].get(m) is not None
                                         for _, r in series)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, r in series:
            xs = [c["clip"] + 1 for c in r["clips"] if c.get(m) is not None]
            ys = [c[m] for c in r["clips"] if c.get(m) is not None]
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_title(m)
        ax.set_xlabel("clip")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_video(path: str) -> np.ndarray:
    if path.endswith(".npz") or path.endswith(".npy"):
        data = np.load(path)
        return np.asarray(data["frames"] if hasattr(data, "files") else data)
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def read_image(path: str) -> np.ndarray:
    import imageio.v3 as iio

    img = np.asarray(iio.imread(path))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m svi_jax.eval.drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="the stitched long video (.mp4, or .npz with 'frames')")
    p.add_argument("--reference", required=True, help="the reference (first) image")
    p.add_argument("--out", required=True, help="output directory for drift.json and drift.png")
    p.add_argument("--clip_frames", type=int, default=None,
                   help="new frames per clip in the stitched video (default: from the sampler's <video>.json, else 80)")
    p.add_argument("--first_clip_frames", type=int, default=None, help="frames of the first clip (default: same)")
    p.add_argument("--ground_truth", default=None, help="ground-truth continuation (.mp4 or .npz), frame-aligned")
    a = p.parse_args(argv)
    clip_frames, first = a.clip_frames, a.first_clip_frames
    side = os.path.splitext(a.video)[0] + ".json"
    if clip_frames is None and os.path.isfile(side):
        meta = json.load(open(side))
        clip_frames = meta.get("new_frames_per_clip") or meta.get("clip_frames")
        first = first or meta.get("first_clip_frames")
    clip_frames = clip_frames or 80
    video = read_video(a.video)
    truth = read_video(a.ground_truth) if a.ground_truth else None
    original = read_image(a.reference)
    reference, resized = match_size(original, video.shape[1:3])
    if resized:
        print(f"note: the reference ({original.shape[1]}x{original.shape[0]}) was "
              f"resized to the video's frame size ({video.shape[2]}x{video.shape[1]}) before comparing")
    res = per_clip(video, reference, clip_frames, truth, first)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "drift.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(a.out, "drift.png"), title=os.path.basename(a.video))
    last = res["clips"][-1]
    print(f"{len(res['clips'])} clips; last clip: color shift {last['color_shift']:.4f}, hist {last['hist_dist']:.3f}, "
          f"sharpness x{last['sharpness_ratio']:.2f} -> {a.out}")
    return 0


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    sys.exit(cli.run(main))
