"""The drift experiment end to end at smoke size: data, base pre-training, LoRAs, chained rollouts, metrics, report."""
from __future__ import annotations

import json
import os

from configs import drift as drift_cfg
from svi_jax.experiments import drift


def test_quick_experiment_writes_report_and_plot(tmp_path):
    config = drift_cfg.get_quick_config()
    res = drift.run(config, str(tmp_path / "run"), report_path=str(tmp_path / "docs" / "drift.md"), command="test")
    run = tmp_path / "run"
    results = json.load(open(run / "results.json"))
    models = set(results["summary"])
    assert {"base", "erft", "film_erft", "film_base"} <= models
    for name in models:
        rollouts = json.load(open(run / "rollouts" / f"{name}.json"))
        assert len(rollouts) == 1 and len(rollouts[0]["clips"]) == config.experiment.num_clips
        assert all(c["psnr"] > 0 for c in rollouts[0]["clips"])
    assert os.path.getsize(run / "drift.png") > 1000 and os.path.getsize(tmp_path / "docs" / "drift" / "drift.png")
    assert "| erft |" in res["report"] and "clip 3" in res["report"]
    # stitched length: each clip but the last gives up its m overlap frames (Shot m=1, Film m=5)
    import numpy as np

    shot = np.load(run / "rollouts" / "erft_camera.npz")["frames"]
    film = np.load(run / "rollouts" / "film_erft_camera.npz")["frames"]
    t = config.data.num_frames
    assert shot.shape[0] == 3 * (t - 1) + 1 and film.shape[0] == 3 * (t - 5) + 5
