"""Drift metrics on inputs with known answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from svi_jax.eval import drift

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(t=12, h=32, w=40, seed=0):
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (h, w), anti_aliasing=True)
    r = np.random.RandomState(seed)
    return np.clip(np.stack([img + 0.002 * r.randn(*img.shape) for _ in range(t)]), 0, 1), img


def test_identical_video_has_no_drift():
    video, ref = _scene()
    res = drift.per_clip(video, ref, clip_frames=4, truth=video)
    for c in res["clips"]:
        assert c["color_shift"] < 2e-3 and c["hist_dist"] < 0.05 and abs(c["sharpness_ratio"] - 1) < 0.2
        assert c["psnr"] >= 99 and c["ssim"] > 0.999
    assert [(c["start"], c["end"]) for c in res["clips"]] == [(0, 4), (4, 8), (8, 12)]


def test_psnr_ssim_at_a_known_noise_level():
    """Gaussian noise of sd 0.05 on mid-grey-ranged frames: PSNR = 10 log10(1 / MSE) per frame, averaged (about 26 dB),
    written here; SSIM drops below 1 and falls further with more noise."""
    video, _ = _scene()
    video = 0.25 + 0.5 * video                                   # in [0.25, 0.75]: the noise is never clipped
    r = np.random.RandomState(1)
    noisy = {sd: np.clip(video + sd * r.randn(*video.shape), 0, 1) for sd in (0.02, 0.05, 0.1)}
    want = np.mean([10 * np.log10(1.0 / np.mean((noisy[0.05][i] - video[i]) ** 2)) for i in range(len(video))])
    p, s = drift.psnr_ssim(noisy[0.05], video)
    assert abs(p - want) < 1e-6 and abs(p - 20 * np.log10(1 / 0.05)) < 0.3, (p, want)
    ssims = [drift.psnr_ssim(noisy[sd], video)[1] for sd in (0.02, 0.05, 0.1)]
    assert 0.1 < ssims[2] < ssims[1] < ssims[0] < 0.99 and ssims[1] == s


def test_known_color_offset_is_measured():
    video, ref = _scene()
    shifted = video.copy()
    shifted[8:, ..., 0] = np.clip(shifted[8:, ..., 0] + 0.1, 0, 1)   # red +0.1 from clip 3 on
    res = drift.per_clip(shifted, ref, clip_frames=4)
    rgb = res["clips"][2]["color_shift_rgb"]
    assert abs(rgb[0] - 0.1) < 0.02 and abs(rgb[1]) < 0.01 and abs(rgb[2]) < 0.01
    assert res["clips"][2]["color_shift"] > 10 * res["clips"][0]["color_shift"]
    assert res["clips"][2]["hist_dist"] > res["clips"][0]["hist_dist"]


def test_blur_lowers_sharpness_and_jump_shows_as_flicker():
    from scipy import ndimage

    video, ref = _scene()
    blurred = video.copy()
    blurred[4:] = ndimage.gaussian_filter(video[4:], sigma=(0, 1.5, 1.5, 0))
    res = drift.per_clip(blurred, ref, clip_frames=4)
    assert res["clips"][1]["sharpness_ratio"] < 0.5 * res["clips"][0]["sharpness_ratio"]
    # clip 2 boundary is the blur jump; clip 3 boundary is as smooth as the rest
    assert res["clips"][1]["boundary_flicker"] > 3 and res["clips"][2]["boundary_flicker"] < 2


def test_cli_writes_json_and_plot(tmp_path):
    import imageio.v3 as iio

    video, ref = _scene(t=9)
    np.savez(tmp_path / "v.npz", frames=(video * 255).astype(np.uint8))
    iio.imwrite(tmp_path / "ref.png", (ref * 255).astype(np.uint8))
    r = subprocess.run([sys.executable, "-m", "svi_jax.eval.drift", "--video", str(tmp_path / "v.npz"), "--reference",
                        str(tmp_path / "ref.png"), "--out", str(tmp_path / "out"), "--clip_frames", "4",
                        "--first_clip_frames", "5"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    res = json.load(open(tmp_path / "out" / "drift.json"))
    assert [(c["start"], c["end"]) for c in res["clips"]] == [(0, 5), (5, 9)]
    assert os.path.getsize(tmp_path / "out" / "drift.png") > 1000


def test_clip_bounds_of_a_stitched_video():
    # 3 clips of 17 frames with 1 overlap frame: 16 + 16 + 17 = 49 frames
    assert drift.clip_bounds(49, 16) == [(0, 16), (16, 32), (32, 49)]
    assert drift.clip_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]


def test_psnr_first_frame_and_known_noise_level():
    video, ref = _scene(t=8)
    r = np.random.RandomState(1)
    noisy = video.copy()
    noisy[4:] = video[4:] + 0.05 * r.randn(*video[4:].shape)    # sigma 0.05 -> PSNR = 20 log10(1/0.05) = 26 dB
    res = drift.per_clip(noisy, ref, clip_frames=4)
    assert res["clips"][0]["psnr_first_frame"] > 45
    assert abs(res["clips"][1]["psnr_first_frame"] - 26.02) < 0.3


def test_reference_is_resized_to_the_frames(tmp_path):
    import imageio.v3 as iio
    from skimage import data, transform

    big = (transform.resize(data.astronaut(), (128, 160), anti_aliasing=True) * 255).astype(np.uint8)
    small, resized = drift.match_size(big, (32, 40))
    assert resized and small.shape == (32, 40, 3)
    video = np.stack([small] * 8)
    res = drift.per_clip(video, big, clip_frames=4)      # the reference is larger than the frames
    assert abs(res["clips"][0]["sharpness_ratio"] - 1) < 1e-6 and res["clips"][0]["psnr_first_frame"] >= 99
    np.savez(tmp_path / "v.npz", frames=video)
    iio.imwrite(tmp_path / "ref.png", big)
    r = subprocess.run([sys.executable, "-m", "svi_jax.eval.drift", "--video", str(tmp_path / "v.npz"), "--reference",
                        str(tmp_path / "ref.png"), "--out", str(tmp_path / "out"), "--clip_frames", "4"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "resized to the video's frame size (40x32)" in r.stdout
    assert "sharpness x1.00" in r.stdout
