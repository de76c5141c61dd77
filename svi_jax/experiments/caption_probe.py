"""Does a model read the caption? Clip 1 from each held-out picture with the true caption and with a wrong one.

  python -m svi_jax.experiments.caption_probe [--num_steps 10] [--lora FILE] [--json OUT.json]

For every held-out start (svi_jax/data/scroll.py: direction and speed named in the caption), one clip is generated
with the true caption and one with the same picture, seed and noise but another direction in the caption. Reported
per start (PSNR in dB over the frames after the first):

* ``true_vs_wrong``: the two generations against each other (high = the caption changes little);
* ``psnr_gt``: the true-caption clip against the true continuation;
* ``psnr_mean_motion``: against the mean of all 16 possible continuations (every direction x speed) -- what a model
  that cannot tell the motion apart minimises its loss with;
* ``psnr_static``: against the reference frame repeated (no motion);
* ``best_motion``: the direction and speed whose continuation the last 8 frames are closest to.

A model that reads the caption has ``psnr_gt`` above ``psnr_mean_motion`` and a low ``true_vs_wrong``; a model that
averages over the motions it cannot tell apart has it the other way round (the blur of docs/drift.md).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def _psnr(a, b) -> float:
    from svi_jax.eval import drift

    return drift.psnr(np.asarray(a, np.float64) / 255.0, np.asarray(b, np.float64) / 255.0)


def _wrong_direction(direction: str) -> str:
    return "right" if direction != "right" else "left"


def probe_case(sampler, case, height: int, width: int, seed: int = 0) -> dict:
    """The probe's numbers for one held-out start (see the module docstring)."""
    from svi_jax.data import scroll
    from svi_jax.eval import drift

    ref = case.frame0(height, width)
    true = sampler.rollout(ref, [case.caption], seed)
    wrong = sampler.rollout(ref, [scroll.caption(_wrong_direction(case.direction), case.speed)], seed)
    n = len(true)
    motions = [(d, s) for d in scroll.DIRECTIONS for s in scroll.SPEEDS]
    truths = {m: scroll.make_scroll(ref, n, *m) for m in motions}
    mean_motion = np.mean([t.astype(np.float64) for t in truths.values()], 0)
    last = slice(max(1, n - 8), n)
    best = max(motions, key=lambda m: _psnr(true[last], truths[m][last]))
    return {"picture": case.picture, "direction": case.direction, "speed": case.speed,
            "true_vs_wrong": _psnr(true[1:], wrong[1:]),
            "psnr_gt": _psnr(true[1:], truths[(case.direction, case.speed)][1:]),
            "psnr_mean_motion": _psnr(true[1:], mean_motion[1:]),
            "psnr_static": _psnr(true[1:], np.repeat(ref[None], n - 1, 0)),
            "sharpness_ratio": drift.sharpness_ratio(true, ref),
            "best_motion": list(best)}


def run(config, num_steps: int = 10, lora: str | None = None, cases=None, seed: int = 0) -> list:
    from svi_jax.data import scroll
    from svi_jax.models.dit import DiT
    from svi_jax.sample import LongVideoSampler

    kw = {}
    if lora:
        dit = DiT.from_dir(config.checkpoints.dit, lora=lora)
        kw = dict(dit_params=dit.params, dit_config=dit.config)
    sampler = LongVideoSampler(config, num_steps=num_steps, shift=float(config.erft.shift), cfg_scale=1.0,
                               motion_frames=1, pad="zero", **kw)
    cases = scroll.heldout_specs() if cases is None else cases
    return [probe_case(sampler, c, config.data.height, config.data.width, seed) for c in cases]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m svi_jax.experiments.caption_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_steps", type=int, default=10, help="Euler steps per clip (docs/drift.md: 10)")
    p.add_argument("--lora", default=None, help="a LoRA file to merge into the tiny base first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    from configs import tiny
    from svi_jax.logs import quiet_logs

    quiet_logs()
    rows = run(tiny.get_config(), a.num_steps, a.lora, seed=a.seed)
    print("| start (motion) | true vs wrong caption | vs truth | vs mean of 16 motions | vs static | sharpness "
          "| closest motion |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['picture']} ({r['direction']}, {r['speed']} px) | {r['true_vs_wrong']:.1f} | {r['psnr_gt']:.1f} "
              f"| {r['psnr_mean_motion']:.1f} | {r['psnr_static']:.1f} | {r['sharpness_ratio']:.2f} "
              f"| {r['best_motion'][0]}, {r['best_motion'][1]} px |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
