"""The caption probe (svi_jax/experiments/caption_probe.py) tells a model that reads the caption from one that
averages over the motions: checked with stand-in samplers whose answers are known (no DiT needed)."""
from __future__ import annotations

import numpy as np

from svi_jax.data import scroll
from svi_jax.experiments import caption_probe

H, W, T = 32, 48, 17


def _motion_of(caption: str):
    for d in sorted(scroll.DIRECTIONS, key=len, reverse=True):   # "up-left" before "up"
        for s in scroll.SPEEDS:
            if f"pans {d} at {s} px" in caption:
                return d, s
    raise AssertionError(caption)


class _Reader:
    """Generates exactly the continuation its caption names."""
    def rollout(self, ref, captions, seed):
        return scroll.make_scroll(ref, T, *_motion_of(captions[0]))


class _Averager:
    """Ignores the caption: the mean of every possible continuation (what the blurred base does)."""
    def rollout(self, ref, captions, seed):
        m = [scroll.make_scroll(ref, T, d, s).astype(np.float64) for d in scroll.DIRECTIONS for s in scroll.SPEEDS]
        return np.rint(np.mean(m, 0)).astype(np.uint8)


def test_probe_separates_a_caption_reader_from_an_averager():
    case = scroll.heldout_specs()[0]
    reader = caption_probe.probe_case(_Reader(), case, H, W)
    averager = caption_probe.probe_case(_Averager(), case, H, W)
    assert reader["psnr_gt"] == 100.0 and reader["best_motion"] == [case.direction, case.speed]
    assert reader["psnr_gt"] > reader["psnr_mean_motion"] and reader["true_vs_wrong"] < 30
    assert averager["true_vs_wrong"] == 100.0                     # the caption changes nothing
    assert averager["psnr_mean_motion"] > 45 > averager["psnr_gt"] + 10
    assert averager["sharpness_ratio"] < reader["sharpness_ratio"]
