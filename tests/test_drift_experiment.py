"""The drift experiment end to end at smoke size: data, codec, base pre-training, LoRAs, chained rollouts, metrics,
paired differences, report."""
from __future__ import annotations

import json
import os

import numpy as np

from configs import drift as drift_cfg
from svi_jax.experiments import drift, drift_report

KEYS = ("colour_shift", "hist_dist", "sharpness_ratio", "psnr_gt", "ssim_gt", "flicker", "psnr_first_frame")


def test_quick_experiment_writes_results_report_and_plots(tmp_path):
    config = drift_cfg.get_quick_config()
    e = config.experiment
    res = drift.run(config, str(tmp_path / "run"), report_path=str(tmp_path / "docs" / "drift.md"), command="test")
    run = tmp_path / "run"
    results = json.load(open(tmp_path / "docs" / "drift" / "results.json"))
    models = set(results["models"])
    assert {"base", "plain", "erft", "film_erft", "film_base", "erft_K2", "erft_s0.5"} <= models
    n_roll = len(e.heldout_images) * len(e.seeds)
    for name in models:
        for key in KEYS:
            m = results["models"][name][key]
            assert len(m["mean"]) == e.num_clips and len(m["values"]) == e.num_clips
            assert all(len(v) == n_roll for v in m["values"])
        rollouts = json.load(open(run / "rollouts" / f"{name}.json"))
        assert len(rollouts) == n_roll and all(c["psnr"] > 0 for c in rollouts[0]["clips"])
    # paired differences vs plain, per clip mark, with an interval that holds the mean
    p = results["paired_vs_plain"]["erft"]
    assert p["vs"] == "plain" and results["paired_vs_plain"]["film_erft"]["vs"] == "film_plain" \
        if "film_plain" in models else p["vs"] == "plain"
    cell = p["psnr_gt"][str(e.num_clips)]
    assert cell["n"] == n_roll and cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    assert results["settings"]["experiment"]["seeds"] == list(e.seeds)
    for f in ("drift.png", "paired.png", "training.png", "strip.png"):
        assert os.path.getsize(tmp_path / "docs" / "drift" / f) > 1000
    # a second pass re-uses what the first trained and rolled out, and adds its (near-zero) time to the first's
    drift.run(config, str(run), command="test")
    t1, t2 = results["timings"], json.load(open(run / "results.json"))["timings"]
    assert t1["passes"] == 1 and t2["passes"] == 2, (t1, t2)
    assert t1["loras"] <= t2["loras"] < t1["loras"] + 5 and t1["rollouts"] <= t2["rollouts"] < t1["rollouts"] + 5
    assert "| erft |" in res["report"] and "clip 3" in res["report"] and "erft − plain" in res["report"]
    # stitched length: each clip but the last gives up its m overlap frames (Shot m=1, Film m=5)
    shot = np.load(run / "rollouts" / "erft_camera.npz")["frames"]
    film = np.load(run / "rollouts" / "film_erft_camera.npz")["frames"]
    t = config.data.num_frames
    assert shot.shape[0] == 3 * (t - 1) + 1 and film.shape[0] == 3 * (t - 5) + 5


def test_bootstrap_interval_and_pairing():
    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, 400)
    lo, hi = drift_report.bootstrap_ci(d, 2000)
    assert lo < 0.5 < hi and 0.1 < hi - lo < 0.3          # ~ 2 x 1.96 / sqrt(400) = 0.196
    mk = lambda case, seed, v: {"case": case, "seed": seed, "clips": [{"psnr": v}]}  # noqa: E731
    a = [mk("x", 0, 3.0), mk("x", 1, 5.0), mk("y", 0, 7.0)]
    b = [mk("y", 0, 1.0), mk("x", 0, 2.0)]                 # other order, one rollout missing
    out = drift_report.paired({"plain": b, "erft": a}, [1], 200)
    assert out["erft"]["psnr_gt"]["1"]["n"] == 2 and out["erft"]["psnr_gt"]["1"]["mean"] == 3.5  # (1 + 6) / 2
