#!/usr/bin/env python
"""Input-pipeline throughput: training clips/s through decode + crop + resize (+ float conversion and the
condition/padding assembly) with ClipLoader, and examples/s from the latent cache with LatentLoader.

    python bench/data_bench.py            # 81 x 480 x 832 clips from 720p and 1080p h264 sources
    python bench/data_bench.py --quick    # tiny sizes, seconds

Sources are synthetic (svi_jax.data.synthetic, rendered at 360x640 and upscaled by ffmpeg to the source
size, crf 20). The cache holds Wan-14B-shaped tensors at 81x480x832 (latents [21,60,104,16], y
[21,60,104,20], text [~64 of 512, 4096], CLIP [257,1280], bfloat16) written with stand-in encoders.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _write_source(path, frames, size_hw, crf=20):
    from svi_jax.data.video import ffmpeg_exe

    t, h, w, _ = frames.shape
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "24",
           "-i", "pipe:0", "-vf", f"scale={size_hw[1]}:{size_hw[0]}:flags=bicubic", "-c:v", "libx264",
           "-crf", str(crf), "-pix_fmt", "yuv420p", path]
    subprocess.run(cmd, input=frames.tobytes(), check=True, close_fds=False)


def _clip_rate(dataset, cfg, n, workers):
    from svi_jax.data.loader import ClipLoader

    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = workers
    cfg.prefetch = 2
    with ClipLoader(dataset, cfg, host_id=0, num_hosts=1) as ld:
        next(ld)  # warm-up (thread start, first ffmpeg)
        t = time.perf_counter()
        for _ in range(n):
            b = next(ld)
        dt = time.perf_counter() - t
    assert b["video"].shape[1:] == (cfg.num_frames, cfg.height, cfg.width, 3)
    return n * cfg.batch_size / dt


def _decode_only_rate(dataset, cfg, n):
    """ffmpeg decode + crop + resize alone (no float conversion), one at a time."""
    from svi_jax.data import windows
    from svi_jax.data.builder import open_dataset
    from svi_jax.data.video import decode_bytes

    src = open_dataset(dataset)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        r = src[i % len(src)]
        p = windows.plan_clip(int(r["num_frames"]), int(r["height"]), int(r["width"]), cfg, rng)
        decode_bytes(r["video"], start=p.start, count=p.num_real, stride=p.stride, crop=p.crop,
                     size=(cfg.height, cfg.width), fps=float(r["fps"]))
    return n / (time.perf_counter() - t)


def _cache_rate(dataset, tmp, quick, n_read):
    from svi_jax.data import cache
    from svi_jax.data.config import default_config

    if quick:
        shapes = dict(lat=(5, 2, 3, 16), y=(5, 2, 3, 20), text=(16, 32), clip=(5, 32))
    else:
        shapes = dict(lat=(21, 60, 104, 16), y=(21, 60, 104, 20), text=(512, 4096), clip=(257, 1280))
    rng = np.random.default_rng(0)

    def video(x):
        return rng.standard_normal((x.shape[0],) + shapes["lat"], dtype=np.float32)

    def cond(x, num_cond):
        return rng.standard_normal((x.shape[0],) + shapes["y"], dtype=np.float32)

    def text(caps):
        L, D = shapes["text"]
        mask = np.zeros((len(caps), L), np.int32)
        mask[:, : min(64, L)] = 1
        return rng.standard_normal((len(caps), L, D), dtype=np.float32) * mask[..., None], mask

    def image(x):
        return rng.standard_normal((x.shape[0],) + shapes["clip"], dtype=np.float32)

    enc = cache.Encoders(video=video, text=text, image=image, cond=cond)
    cfg = default_config(num_frames=5, height=16, width=16, batch_size=1, num_workers=1)
    out = os.path.join(tmp, "cache")
    t = time.perf_counter()
    info = cache.write_cache(dataset, out, enc, cfg, windows=4, progress=False)
    write_s = time.perf_counter() - t
    records = info["num_videos"] * info["windows"]
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".array_record"))
    res = {}
    for workers in (1, 2):
        ld = cache.LatentLoader(out, default_config(num_frames=5, height=16, width=16, batch_size=1,
                                                    num_workers=workers, prefetch=2), host_id=0, num_hosts=1)
        next(ld)
        t = time.perf_counter()
        for _ in range(n_read):
            next(ld)
        res[f"cache_examples_per_s_w{workers}"] = round(n_read / (time.perf_counter() - t), 2)
        ld.close()
    res.update(cache_record_mb=round(size / records / 2**20, 2), cache_write_s_per_record=round(write_s / records, 3))
    res["cache_mb_per_s_w2"] = round(res["cache_examples_per_s_w2"] * size / records / 2**20, 1)
    return res


def run(quick: bool) -> dict:
    from svi_jax.data import builder, synthetic
    from svi_jax.data.config import default_config

    if quick:
        sources = {"96x64": (64, 96)}
        cfg = default_config(num_frames=9, height=32, width=48, batch_size=1)
        src_frames, n = 24, 4
    else:
        sources = {"720p": (720, 1280), "1080p": (1080, 1920)}
        cfg = default_config(num_frames=81, height=480, width=832, batch_size=1)
        src_frames, n = 100, 8
    out = {"quick": quick, "window": [cfg.num_frames, cfg.height, cfg.width], "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="svi_data_bench_") as tmp:
        for name, (sh, sw) in sources.items():
            vids = os.path.join(tmp, name, "videos", "bench")
            os.makedirs(vids)
            for i in range(3):
                base = synthetic.make_sequence(synthetic.dataset_specs(3)[i].image, src_frames,
                                               min(sh, 360), min(sw, 640), seed=i, motion="orbit")
                _write_source(os.path.join(vids, f"v{i}.mp4"), base, (sh, sw))
            ds = os.path.join(tmp, name, "ds")
            t = time.perf_counter()
            builder.build_dataset(os.path.dirname(vids), ds, progress=False)
            out[f"{name}_build_s_per_video"] = round((time.perf_counter() - t) / 3, 3)
            out[f"{name}_decode_crop_resize_clips_per_s"] = round(_decode_only_rate(ds, cfg, n), 3)
            for workers in (1, 2):
                out[f"{name}_loader_clips_per_s_w{workers}"] = round(_clip_rate(ds, cfg, n, workers), 3)
            last_ds = ds
        out.update(_cache_rate(last_ds, tmp, quick, 8 if quick else 24))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
