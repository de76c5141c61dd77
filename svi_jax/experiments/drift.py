"""Does ERFT cut autoregressive drift? One command, on a CPU.

  python -m svi_jax.experiments.drift --workdir runs/drift [--quick] [--report docs/drift.md]

Stages (each skipped when its output exists, so an interrupted run continues):

1. data     synthetic clips from scikit-image pictures (train pictures only) -> TFDS dataset;
2. base     pre-train the small Wan-shaped I2V DiT (every weight; first-frame conditioning, zero padding, as Wan I2V);
3. loras    from the same base, the same number of steps each: ``plain`` (no errors), ``erft`` (Shot settings),
            ``no_image_error``, ``no_latent_noise_error`` (paper Tab. 4), ``handcrafted`` (degraded condition frames
            instead of banked errors, Tab. 7); Film-setting LoRAs (5 motion frames, zero padding) for ``film_variants``;
4. rollouts each model chained for ``num_clips`` clips from held-out pictures (pictures never seen in training) by
            ``svi_jax.sample.LongVideoSampler.rollout`` (the sampler users run; clip k has seed ``seed + 42 k``), Shot
            chaining (and Film for the Film LoRAs), for every seed;
5. metrics  svi_jax.eval.drift per clip against the reference image and the ground-truth continuation;
6. report   ``report.md`` + ``drift.png`` + ``results.json`` in the workdir (``--report`` also writes the markdown
            there, with the plot copied beside it).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time

import numpy as np

log = logging.getLogger("svi_jax.experiments.drift")

VARIANT_SETTINGS = {
    "plain": dict(enabled=False),
    "erft": dict(),
    "no_image_error": dict(p_image=0.0),
    "no_latent_noise_error": dict(p_latent=0.0, p_noise=0.0),
    "handcrafted": dict(enabled=False, handcrafted_p=0.9),
}


def _variant_config(config, variant: str, film: bool, base_dit: str, dataset: str):
    c = copy.deepcopy(config)
    e = c.experiment
    c.checkpoints.dit = base_dit
    c.data.dataset = dataset
    c.train.num_steps = e.lora_steps
    c.train.trainable = "lora"
    c.optim.lr = e.lora_lr
    if film:
        c.data.update(num_motion_frames=5, pad_mode="zero")
        c.erft.p_clean = 0.5
    else:
        c.data.update(num_motion_frames=1, pad_mode="ref")
        c.erft.p_clean = 0.2
    c.erft.update(VARIANT_SETTINGS[variant])
    return c


def _train(config, workdir: str, what: str):
    from svi_jax.train import Trainer

    done = os.path.join(workdir, "DONE")
    if os.path.exists(done):
        return json.load(open(done))
    t0 = time.time()
    log.info("training %s (%d steps) -> %s", what, config.train.num_steps, workdir)
    trainer = Trainer(config, workdir)
    summary = trainer.run(progress=False)
    trainer.close()
    if summary["end_step"] < config.train.num_steps:
        raise SystemExit(f"{what} stopped at step {summary['end_step']} (interrupted); re-run to continue")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    tail = rows[-max(1, len(rows) // 10):]
    summary.update(seconds=round(time.time() - t0, 1), final_loss=float(np.mean([r["loss"] for r in tail])))
    json.dump(summary, open(done, "w"))
    return summary


def stage_data(config, workdir: str) -> str:
    from svi_jax.data import builder, synthetic

    e, d = config.experiment, config.data
    videos, dataset = os.path.join(workdir, "videos"), os.path.join(workdir, "dataset")
    if not os.path.isfile(os.path.join(dataset, "summary.json")):
        shutil.rmtree(videos, ignore_errors=True)
        shutil.rmtree(dataset, ignore_errors=True)
        synthetic.write_dataset(videos, num_videos=e.num_train_clips, num_frames=e.data_frames, height=d.height,
                                width=d.width, seed=e.seed, images=list(e.train_images))
        builder.build_dataset(videos, dataset, progress=False)
    return dataset


def stage_base(config, workdir: str, dataset: str) -> str:
    c = copy.deepcopy(config)
    e = c.experiment
    c.data.dataset = dataset
    c.data.update(num_motion_frames=1, pad_mode="zero")
    c.erft.enabled = False
    c.train.update(trainable="full", num_steps=e.base_steps)
    c.optim.lr = e.base_lr
    out = os.path.join(workdir, "base")
    _train(c, out, "the base (full)")
    return os.path.join(out, "dit")


def stage_loras(config, workdir: str, base_dit: str, dataset: str) -> dict:
    runs = {}
    for film in (False, True):
        names = config.experiment.film_variants if film else config.experiment.variants
        for v in names:
            key = ("film_" if film else "") + v
            d = os.path.join(workdir, "lora", key)
            s = _train(_variant_config(config, v, film, base_dit, dataset), d, f"LoRA {key}")
            runs[key] = dict(lora=os.path.join(d, "lora.safetensors"), film=film, **s)
    return runs


def heldout_cases(config):
    """(image, motion, sprite, seed, caption) of each held-out start: pictures never used in training."""
    from svi_jax.data import synthetic

    cases = []
    for i, image in enumerate(config.experiment.heldout_images):
        motion = synthetic.MOTIONS[i % len(synthetic.MOTIONS)]
        seed = 1000 + i
        sprite = synthetic._pick(None, sorted(synthetic.SPRITES), seed, "sprite:" + image,
                                 exclude=synthetic.BACKGROUNDS[image][0])
        cases.append(dict(image=image, motion=motion, sprite=sprite, seed=seed,
                          caption=synthetic.caption_for(image, motion, sprite)))
    return cases


def stage_rollouts(config, workdir: str, base_dit: str, runs: dict) -> dict:
    """Chain every model from every held-out start; returns {model: [result per (case, seed)]}."""
    from svi_jax.data import synthetic
    from svi_jax.eval import drift
    from svi_jax.models.dit import DiT
    from svi_jax.sample import LongVideoSampler

    e, d = config.experiment, config.data
    models = [("base", None, False)] + [(k, r["lora"], r["film"]) for k, r in runs.items()]
    if e.film_variants:
        models.append(("film_base", None, True))
    out = {}
    os.makedirs(os.path.join(workdir, "rollouts"), exist_ok=True)
    for name, lora, film in models:
        path = os.path.join(workdir, "rollouts", f"{name}.json")
        if os.path.exists(path):
            out[name] = json.load(open(path))
            continue
        dit = DiT.from_dir(base_dit, lora=lora)          # Shot: 1 motion frame, reference padding; Film: 5, zeros
        sampler = LongVideoSampler(config, dit_params=dit.params, dit_config=dit.config, num_steps=e.sample_steps,
                                   cfg_scale=e.cfg_scale, motion_frames=5 if film else 1,
                                   pad="zero" if film else "ref")
        results = []
        for case in heldout_cases(config):
            total = sampler.total_frames(e.num_clips)
            truth = synthetic.make_sequence(case["image"], total, d.height, d.width, case["seed"],
                                            motion=case["motion"], sprite=case["sprite"])
            for seed in e.seeds:
                frames = sampler.rollout(truth[0], [case["caption"]] * e.num_clips, seed)
                r = drift.per_clip(frames, truth[0], sampler.new_frames_per_clip, truth,
                                   sampler.new_frames_per_clip)
                r.update(case=case["image"], seed=seed)
                results.append(r)
                if seed == e.seeds[0]:   # keep one rollout per model and start for looking at
                    np.savez_compressed(os.path.join(workdir, "rollouts", f"{name}_{case['image']}.npz"),
                                        frames=frames)
        json.dump(results, open(path, "w"))
        out[name] = results
    return out


METRICS = (("color_shift", "colour shift", False), ("hist_dist", "histogram dist.", False),
           ("sharpness_ratio", "sharpness ratio", None), ("psnr", "PSNR vs GT (dB)", True),
           ("ssim", "SSIM vs GT", True), ("boundary_flicker", "boundary flicker", False))


def aggregate(results: list, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """mean and std over rollouts, per clip index."""
    n = min(len(r["clips"]) for r in results)
    vals = np.array([[r["clips"][k].get(metric) if r["clips"][k].get(metric) is not None else np.nan
                      for k in range(n)] for r in results], np.float64)
    return np.nanmean(vals, 0), np.nanstd(vals, 0)


def report(config, workdir: str, rollouts: dict, runs: dict, timings: dict, report_path: str | None,
           command: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = config.experiment.num_clips
    marks = sorted({k for k in (1, 5, 10, 20) if k <= n} | {n})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.7 * len(METRICS), 3.3), squeeze=False)
    summary = {}
    for ax, (m, label, _) in zip(axes[0], METRICS):
        for name, res in rollouts.items():
            mean, std = aggregate(res, m)
            xs = np.arange(1, len(mean) + 1)
            ok = np.isfinite(mean)
            ax.plot(xs[ok], mean[ok], marker=".", label=name, lw=1.8 if "erft" in name else 1.0)
            ax.fill_between(xs[ok], (mean - std)[ok], (mean + std)[ok], alpha=0.12)
            summary.setdefault(name, {})[m] = {"mean": mean.tolist(), "std": std.tolist()}
        ax.set_title(label)
        ax.set_xlabel("clip")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(workdir, "drift.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    json.dump({"summary": summary, "runs": runs, "timings": timings}, open(os.path.join(workdir, "results.json"),
                                                                             "w"), indent=1)
    lines = [f"Measured with `{command}`; {sum(timings.values()):.0f} s in all on this machine "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", ""]
    for m, label, higher in METRICS:
        lines += [f"**{label}** ({'higher' if higher else 'lower' if higher is False else 'closer to 1'} is better;"
                  f" mean ± std over {len(next(iter(rollouts.values())))} rollouts)", "",
                  "| model | " + " | ".join(f"clip {k}" for k in marks) + " |",
                  "|---|" + "---|" * len(marks)]
        for name in rollouts:
            mean, std = summary[name][m]["mean"], summary[name][m]["std"]
            cells = [("n/a" if not np.isfinite(mean[k - 1]) else f"{mean[k - 1]:.3f} ± {std[k - 1]:.3f}")
                     for k in marks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Training (same number of steps for every LoRA; final loss = mean of the last 10% of steps):", "",
              "| run | steps | final loss | seconds |", "|---|---|---|---|"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r.get('end_step')} | {r.get('final_loss', float('nan')):.4f} | {r.get('seconds')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    if report_path:
        d = os.path.dirname(os.path.abspath(report_path))
        os.makedirs(os.path.join(d, "drift"), exist_ok=True)
        shutil.copy(png, os.path.join(d, "drift", "drift.png"))
        with open(os.path.join(d, "drift", "results.md"), "w") as f:
            f.write(text)
    return text


def run(config, workdir: str, report_path: str | None = None, command: str = "") -> dict:
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t = time.time()
    dataset = stage_data(config, workdir)
    timings["data"] = time.time() - t
    t = time.time()
    base_dit = stage_base(config, workdir, dataset)
    timings["base"] = time.time() - t
    t = time.time()
    runs = stage_loras(config, workdir, base_dit, dataset)
    timings["loras"] = time.time() - t
    t = time.time()
    rollouts = stage_rollouts(config, workdir, base_dit, runs)
    timings["rollouts"] = time.time() - t
    text = report(config, workdir, rollouts, runs, timings, report_path, command)
    return {"report": text, "timings": timings, "workdir": workdir}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m svi_jax.experiments.drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where every stage writes (re-run to continue)")
    p.add_argument("--quick", action="store_true", help="the smoke version: a few steps, 3 clips, 1 seed")
    p.add_argument("--report", default=None, help="also write the tables here (and the plot beside it)")
    a = p.parse_args(argv)
    from configs import drift as drift_cfg
    from svi_jax.train import quiet_logs

    quiet_logs()
    config = drift_cfg.get_quick_config() if a.quick else drift_cfg.get_config()
    cmd = "python -m svi_jax.experiments.drift --workdir " + a.workdir + (" --quick" if a.quick else "")
    res = run(config, os.path.abspath(a.workdir), a.report, cmd)
    print(res["report"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
