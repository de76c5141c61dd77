#!/usr/bin/env python
"""Peak memory and time of the streaming VAE decode for 1+4*80 vs 1+4*20 frames (81 vs 21 latent frames).

Each measurement runs in its own subprocess and reads the process's peak RSS (``VmHWM``; XLA:CPU has no
device memory statistics). Weights are random (memory and time do not depend on them).

    python bench/vae_bench.py            # Wan2.1 VAE (127M params) at 64x64 pixels
    python bench/vae_bench.py --quick    # tiny config, seconds
    python bench/vae_bench.py --height 32 --width 32

Modes: ``decode`` (``VAE.decode``: the result is a host array of the whole video, which grows with the length:
its size is reported as ``output_mb``) and ``iter`` (``VAE.iter_decode``: chunks are dropped as they come, the way
a video writer would consume them). ``whole`` (``chunk=None``: all latent frames in one step, i.e. no streaming)
is measured at the short length for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from svi_jax import cli as _cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT, LONG = 1 + 20, 1 + 80  # latent frames <-> 1+4*20 = 81 and 1+4*80 = 321 video frames


def _worker(a) -> dict:
    import numpy as np

    sys.path.insert(0, REPO)
    from bench import rss_mb
    from svi_jax.convert.common import peak_rss_mb
    from svi_jax.models.vae import VAE, VAEConfig, wan21_config

    if a.tiny:
        cfg = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    else:
        cfg = wan21_config()
    vae = VAE.random(cfg, seed=0)
    s = cfg.spatial_factor
    z = np.random.default_rng(0).standard_normal((1, a.latent_frames, a.height // s, a.width // s, cfg.z_dim))
    z = z.astype(np.float32)
    chunk = None if a.mode == "whole" else 1
    # Warm-up on the same shapes as the measured run (compiles the first-chunk and step functions).
    vae.decode(z[:, : (a.latent_frames if a.mode == "whole" else 2)], chunk=chunk, progress=False)
    ready = rss_mb()
    t0 = time.perf_counter()
    if a.mode == "iter":
        n = 0
        for _, frames in vae.iter_decode(z, progress=False):
            n += frames.shape[1]
        out_mb = 0.0
    else:
        x = vae.decode(z, chunk=chunk, progress=False)
        n, out_mb = x.shape[1], x.nbytes / 2**20
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    params_mb = sum(v.nbytes for v in __import__("jax").tree.leaves(vae.params)) / 2**20
    return {"mode": a.mode, "latent_frames": a.latent_frames, "video_frames": n, "height": a.height,
            "width": a.width, "peak_rss_mb": round(peak, 1), "rss_after_warmup_mb": round(ready, 1),
            "params_mb": round(params_mb, 1), "output_mb": round(out_mb, 1), "decode_s": round(dt, 2),
            "s_per_latent_frame": round(dt / a.latent_frames, 4)}


def measure(latent_frames: int, mode: str, height: int, width: int, tiny: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--latent_frames", str(latent_frames),
           "--mode", mode, "--height", str(height), "--width", str(width)] + (["--tiny"] if tiny else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool, height: int | None = None, width: int | None = None) -> dict:
    """Decode 21 and 81 latent frames (81 / 321 video frames); returns the measurements and the ratios."""
    height = height or (32 if quick else 64)
    width = width or (32 if quick else 64)
    rows = {}
    for mode in ("decode", "iter"):
        for lf in (SHORT, LONG):
            rows[f"{mode}_{lf}"] = measure(lf, mode, height, width, quick)
    rows[f"whole_{SHORT}"] = measure(SHORT, "whole", height, width, quick)
    out = {"config": "tiny (base_dim 8)" if quick else "Wan2.1 (base_dim 96, 127M params)",
           "height": height, "width": width, "runs": rows}
    for mode in ("decode", "iter"):
        s, l = rows[f"{mode}_{SHORT}"], rows[f"{mode}_{LONG}"]
        out[f"{mode}_peak_ratio"] = round(l["peak_rss_mb"] / s["peak_rss_mb"], 3)
        out[f"{mode}_time_ratio"] = round(l["decode_s"] / s["decode_s"], 2)
    out["whole_vs_streaming_peak_ratio"] = round(rows[f"whole_{SHORT}"]["peak_rss_mb"]
                                                 / rows[f"decode_{SHORT}"]["peak_rss_mb"], 3)
    return out


def main(argv=None) -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config and size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--latent_frames", type=int, default=SHORT, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="decode", choices=("decode", "iter", "whole"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)))
        return 0
    res = run(a.quick, a.height, a.width)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
