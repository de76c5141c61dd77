"""The frame strip of docs/sampling.md: what the tiny model makes of a held-out picture, chained clip after clip.

  python -m svi_jax.experiments.tiny_strip --out docs/sampling/tiny_strip.png [--lora runs/tiny/lora.safetensors]
      [--picture rocket] [--num_clips 10] [--base svi_jax/assets/tiny_base] [--json OUT.json]

One held-out start (svi_jax/data/scroll.py: never trained on; its caption names the motion) is chained for
``--num_clips`` clips with Shot conditioning (the last frame of a clip conditions the next, reference padding), by
the base alone and, with ``--lora``, by the base + that LoRA (e.g. the tiny default of README command 1). Rows of
the strip: the true continuation, the base, the LoRA; columns: frames 0, 8, 16, then every 32nd. It prints, per
clip, the metrics of :mod:`svi_jax.eval.drift` (first frame vs the reference, sharpness ratio, PSNR vs the truth,
colour shift), and ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def columns(total: int) -> list:
    return [c for c in [0, 8, 16] + list(range(32, total, 32)) if c < total]


def rollout(config, case, num_clips: int, num_steps: int, lora=None, seed: int = 0):
    """``(frames, truth, per-clip metrics, seconds)`` of one Shot-chained rollout from ``case``."""
    from svi_jax.data import scroll
    from svi_jax.eval import drift
    from svi_jax.long_video import LongVideoSampler

    d = config.data
    sampler = LongVideoSampler(config, lora=lora, num_steps=num_steps, shift=float(config.erft.shift),
                               cfg_scale=1.0, motion_frames=1, pad="ref")
    ref = case.frame0(d.height, d.width)
    t0 = time.perf_counter()
    frames = sampler.rollout(ref, [case.caption] * num_clips, seed)
    seconds = time.perf_counter() - t0
    truth = scroll.make_scroll(ref, len(frames), case.direction, case.speed)
    n = sampler.new_frames_per_clip
    return frames, truth, drift.per_clip(frames, ref, n, truth, n)["clips"], seconds


def main(argv=None) -> int:
    from svi_jax import cli

    p = cli.ArgumentParser(prog="python -m svi_jax.experiments.tiny_strip", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/sampling/tiny_strip.png", help="the PNG strip")
    p.add_argument("--lora", default=None, help="a LoRA of the tiny base (a run dir or .safetensors) for row 3")
    p.add_argument("--picture", default="rocket", help="a held-out picture (camera, brick, rocket, "
                                                       "stereo_motorcycle)")
    p.add_argument("--num_clips", type=int, default=10)
    p.add_argument("--num_steps", type=int, default=10, help="Euler steps per clip (docs/drift.md: 10)")
    p.add_argument("--base", default="", help="a base dir (dit/ + codec.npz); default: the shipped tiny base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the per-clip metrics here")
    a = p.parse_args(argv)
    from PIL import Image

    from configs import tiny
    from svi_jax.data import scroll
    from svi_jax.experiments.drift import with_base
    from svi_jax.logs import quiet_logs

    quiet_logs()
    config = with_base(tiny.get_config(), a.base) if a.base else tiny.get_config()
    cases = {c.picture: c for c in scroll.heldout_specs()}
    if a.picture not in cases:
        raise ValueError(f"--picture must be a held-out picture, one of {', '.join(cases)}; got {a.picture!r}")
    case = cases[a.picture]
    rows, report = [], {"picture": case.picture, "caption": case.caption, "num_steps": a.num_steps,
                        "num_clips": a.num_clips, "seed": a.seed}
    truth = None
    for name, lora in [("base", None)] + ([("lora", a.lora)] if a.lora else []):
        frames, truth, clips, seconds = rollout(config, case, a.num_clips, a.num_steps, lora, a.seed)
        report[name] = {"seconds": round(seconds, 1), "clips": clips}
        rows.append(frames)
        print(f"{name}: {len(frames)} frames in {seconds:.0f} s")
        print("| clip | first frame (dB) | sharpness ratio | PSNR vs truth (dB) | colour shift |\n"
              "|---|---|---|---|---|")
        for r in clips:
            print(f"| {r['clip'] + 1} | {r['psnr_first_frame']:.1f} | {r['sharpness_ratio']:.2f} | "
                  f"{r.get('psnr', float('nan')):.1f} | {r['color_shift']:.3f} |")
    cols = columns(len(truth))
    strip = np.concatenate([np.concatenate([v[c] for c in cols], axis=1) for v in [truth] + rows], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(a.out)
    print(f"frames {cols} of truth / " + " / ".join(["base"] + (["lora"] if a.lora else [])) + f" -> {a.out}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    from svi_jax import cli as _cli

    raise SystemExit(_cli.run(main))
