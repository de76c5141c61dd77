"""The shipped tiny base (svi_jax/assets/tiny_base) really generates video: on a held-out picture, the first
generated frame keeps the reference (>= 28 dB PSNR) at the documented settings (docs/drift.md: 10 Euler steps,
shift 1, no CFG, Wan-I2V zero padding), as sharp as it, and the clip follows the captioned motion."""
from __future__ import annotations

import numpy as np

from configs import tiny
from svi_jax.data import scroll
from svi_jax.eval import drift
from svi_jax.sample import LongVideoSampler


def test_shipped_base_keeps_the_picture_and_moves_it():
    config = tiny.get_config()
    case = scroll.heldout_specs()[0]                     # camera, pans left at 1 px per frame: never trained on
    ref = case.frame0(config.data.height, config.data.width)
    sampler = LongVideoSampler(config, num_steps=10, shift=float(config.erft.shift), cfg_scale=1.0, motion_frames=1,
                               pad="zero")
    frames = sampler.rollout(ref, [case.caption], seed=0)
    truth = scroll.make_scroll(ref, len(frames), case.direction, case.speed)
    clip = drift.per_clip(frames, ref, sampler.new_frames_per_clip, truth)["clips"][0]
    assert clip["psnr_first_frame"] >= 28.0, clip
    assert 0.6 <= clip["sharpness_ratio"] <= 1.6, clip
    # it moves the way the caption says: closer to the true continuation than to a still picture
    still = np.stack([ref] * len(frames))
    assert drift.psnr_ssim(frames[1:], truth[1:])[0] > drift.psnr_ssim(frames[1:], still[1:])[0] + 1.0
