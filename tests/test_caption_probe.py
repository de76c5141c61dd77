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


def test_sampler_sweep_metrics_and_bar_marks_on_known_clips():
    """The sweep's clip metrics on clips whose answers are known: the true continuation is 100 dB everywhere with
    sharpness 1; the reference repeated (no motion) keeps the first frame but not the truth; a blurred copy misses
    the sharpness bar and is marked so."""
    from svi_jax.experiments import sampler_sweep

    case = scroll.heldout_specs()[0]
    ref = case.frame0(H, W)
    truth = scroll.make_scroll(ref, T, case.direction, case.speed)
    m = sampler_sweep.clip_metrics(truth, ref, truth)
    assert m["psnr_first_frame"] == 100.0 and m["psnr_gt"] == 100.0
    assert abs(m["sharpness_ratio"] - 1.0) < 0.1
    still = sampler_sweep.clip_metrics(np.repeat(ref[None], T, 0), ref, truth)
    assert still["psnr_first_frame"] == 100.0 and still["psnr_gt"] < 30
    blur = ((truth.astype(np.float64) + np.roll(truth, 1, 2) + np.roll(truth, 1, 1) + np.roll(truth, -1, 2)) / 4)
    b = sampler_sweep.clip_metrics(np.rint(blur).astype(np.uint8), ref, truth)
    assert b["sharpness_ratio"] < 0.6 and not sampler_sweep.meets("sharpness_ratio", b["sharpness_ratio"])
    row = dict(steps=10, cfg_scale=1.0, shift=1.0, picture=case.picture, **b)
    assert "✗" in sampler_sweep.table([row]).splitlines()[-1]
    assert sampler_sweep.parse_settings("10:1:1,40:1.1:3")[1] == {"steps": 40, "cfg_scale": 1.1, "shift": 3.0}
