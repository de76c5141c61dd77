"""Does ERFT cut autoregressive drift? One command, on a CPU.

  python -m svi_jax.experiments.drift --workdir runs/drift [--quick] [--report docs/drift.md]

Stages (each skipped when its output exists, so an interrupted run continues):

1. data     pictures scrolling on a torus (direction and speed in the caption; training pictures only) -> TFDS;
2. base     the shipped base (svi_jax/assets/tiny_base), or with ``--train_base``: fit the PCA codec and pre-train
            the small Wan-shaped I2V DiT (every weight; first-frame conditioning, zero padding, as Wan I2V);
3. loras    from the same base, the same number of steps each: ``plain`` (no errors), ``erft`` (Shot settings),
            ``no_image_error``, ``no_latent_noise_error`` (paper Tab. 4), ``handcrafted`` (degraded condition frames
            instead of banked errors, Tab. 7); Film-setting LoRAs (5 motion frames, zero padding) for ``film_variants``;
            ERFT LoRAs with other bank sizes for ``capacities`` (Tab. 8);
4. rollouts each model chained for ``num_clips`` clips from held-out pictures (pictures never seen in training) by
            the sampler users run, all (start, seed) pairs as one batch (``svi_jax.rollout_batch``; clip k has seed
            ``seed + 42 k``), Shot chaining (and Film for the Film LoRAs), for every seed; the ERFT LoRA at the
            ``strengths`` (Tab. 7 bottom);
5. metrics  svi_jax.eval.drift per clip against the reference image and the ground-truth continuation;
6. report   ``report.md``, ``results.json``, ``drift.png``, ``paired.png`` (paired differences vs plain with
            bootstrap 95% intervals) and ``strip.png`` (frames of clips 1, 10, 20) in the workdir; ``--report
            docs/drift.md`` copies them to ``docs/drift/`` (the prose of docs/drift.md is written by hand).
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
    "handcrafted": dict(enabled=False),
}
BASELINE_SETTINGS = {"handcrafted": dict(handcrafted_p=0.9)}   # config.baseline of a variant


def _variant_config(config, variant: str, film: bool, base_dir: str, dataset: str):
    c = with_base(config, base_dir)
    e = c.experiment
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
    c.baseline.update(BASELINE_SETTINGS.get(variant, {}))
    return c


def _train(config, workdir: str, what: str):
    from svi_jax.train import Trainer
    from svi_jax.train.metrics import step_rows

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
    rows = step_rows(workdir)
    tail = rows[-max(1, len(rows) // 10):]
    summary.update(seconds=round(time.time() - t0, 1), final_loss=float(np.mean([r["loss"] for r in tail])))
    json.dump(summary, open(done, "w"))
    return summary


def stage_data(config, workdir: str) -> str:
    from svi_jax.data import builder, scroll

    e, d = config.experiment, config.data
    videos, dataset = os.path.join(workdir, "videos"), os.path.join(workdir, "dataset")
    if not os.path.isfile(os.path.join(dataset, "summary.json")):
        shutil.rmtree(videos, ignore_errors=True)
        shutil.rmtree(dataset, ignore_errors=True)
        scroll.write_dataset(videos, num_videos=e.num_train_clips, num_frames=e.data_frames, height=d.height,
                             width=d.width, seed=e.seed)
        builder.build_dataset(videos, dataset, progress=False)
    return dataset


def stage_codec(config, workdir: str) -> str:
    """Fit the PCA codec on training clips (closed form, seconds) -> ``<workdir>/base/codec.npz``."""
    from svi_jax.data import scroll
    from svi_jax.models import patch_vae

    e, d = config.experiment, config.data
    path = os.path.join(workdir, "base", "codec.npz")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        specs = scroll.dataset_specs(e.codec_clips, e.seed)
        clips = np.stack([scroll.make_scroll(s.frame0(d.height, d.width), d.num_frames, s.direction, s.speed)
                          for s in specs]).astype(np.float32) / 127.5 - 1.0
        spec = config.encoders.vae.to_dict()
        pc = patch_vae.PatchVAEConfig.from_dict({**spec, "basis": ""})
        np.savez(path + ".tmp.npz", **patch_vae.fit_pca(pc, clips, pc.components))
        os.replace(path + ".tmp.npz", path)
    return path


def with_base(config, base_dir: str):
    """``config`` with the DiT and the codec of ``base_dir`` (``dit/`` or the dir itself, and ``codec.npz``)."""
    c = copy.deepcopy(config)
    dit = os.path.join(base_dir, "dit")
    c.checkpoints.dit = dit if os.path.isdir(dit) else base_dir
    c.encoders.vae.basis = os.path.join(base_dir, "codec.npz")
    return c


def stage_base(config, workdir: str, dataset: str) -> str:
    """The base: the shipped one (``experiment.base``), or pre-trained here on every weight. Returns its dir."""
    e = config.experiment
    if e.base:
        return e.base
    out, init = os.path.join(workdir, "base"), e.base_init
    if init:      # continuing a base keeps its codec (a re-fitted basis could differ in sign)
        os.makedirs(out, exist_ok=True)
        if not os.path.exists(os.path.join(out, "codec.npz")):
            shutil.copyfile(os.path.join(init, "codec.npz"), os.path.join(out, "codec.npz"))
    else:
        stage_codec(config, workdir)
    c = with_base(config, out)
    # '' = a random init; a base directory (its dit/) = continue pre-training from it (e.g. on new captions)
    c.checkpoints.dit = os.path.join(init, "dit") if init else ""
    c.data.dataset = dataset
    # conditioning of every kind the base will meet: Wan-I2V (first frame, zero padding), SVI-Shot (reference
    # padding) and Film (5 motion frames), so LoRAs start in distribution whichever they fine-tune for
    c.data.update(num_motion_frames=int(e.base_motion_frames), p_motion=float(e.base_p_motion),
                  pad_mode=e.base_pad_mode, batch_size=e.base_batch)
    c.erft.enabled = False
    c.train.update(trainable="full", num_steps=e.base_steps)
    c.optim.update(lr=e.base_lr, schedule=e.base_schedule)
    _train(c, out, "the base (full)")
    return out


def stage_loras(config, workdir: str, base_dir: str, dataset: str) -> dict:
    runs = {}
    for film in (False, True):
        names = config.experiment.film_variants if film else config.experiment.variants
        for v in names:
            key = ("film_" if film else "") + v
            d = os.path.join(workdir, "lora", key)
            s = _train(_variant_config(config, v, film, base_dir, dataset), d, f"LoRA {key}")
            runs[key] = dict(lora=os.path.join(d, "lora.safetensors"), film=film, **s)
    for cap in config.experiment.capacities:     # bank-size sweep (Tab. 8)
        key, d = f"erft_K{cap}", os.path.join(workdir, "lora", f"erft_K{cap}")
        c = _variant_config(config, "erft", False, base_dir, dataset)
        c.erft.capacity = int(cap)
        s = _train(c, d, f"LoRA {key}")
        runs[key] = dict(lora=os.path.join(d, "lora.safetensors"), film=False, **s)
    return runs


def heldout_cases(config):
    """Held-out starts (pictures never used in training), each with its own captioned direction and speed."""
    from svi_jax.data import scroll

    return scroll.heldout_specs(tuple(config.experiment.heldout_images))


def model_list(config, runs: dict) -> list:
    """(name, lora file or None, film?, LoRA strength) of every model to roll out."""
    e = config.experiment
    models = [("base", None, False, 1.0)]
    for k, r in runs.items():
        models.append((k, r["lora"], r["film"], 1.0))
    if "erft" in runs:
        models += [(f"erft_s{s:g}", runs["erft"]["lora"], False, float(s)) for s in e.strengths]
    if e.film_variants:
        models.append(("film_base", None, True, 1.0))
    return models


def stage_rollouts(config, workdir: str, base_dir: str, runs: dict) -> dict:
    """Chain every model from every held-out start and seed (paired: the same start, seed and noise for every
    model); returns {model: [result per (case, seed)]}."""
    from svi_jax.data import scroll
    from svi_jax.eval import drift
    from svi_jax.models.dit import DiT
    from svi_jax.long_video import LongVideoSampler
    from svi_jax.rollout_batch import RolloutBatch

    e, d = config.experiment, config.data
    cfg = with_base(config, base_dir)
    out = {}
    os.makedirs(os.path.join(workdir, "rollouts"), exist_ok=True)
    for name, lora, film, strength in model_list(config, runs):
        path = os.path.join(workdir, "rollouts", f"{name}.json")
        if os.path.exists(path):
            out[name] = json.load(open(path))
            continue
        dit = DiT.from_dir(cfg.checkpoints.dit, lora=lora, lora_scale=strength)
        sampler = LongVideoSampler(cfg, dit_params=dit.params, dit_config=dit.config, num_steps=e.sample_steps,
                                   shift=float(config.erft.shift), cfg_scale=e.cfg_scale,
                                   motion_frames=5 if film else 1,
                                   pad="zero" if film else "ref")
        # every (start, seed) pair as one batch (svi_jax.rollout_batch: the rollouts the sampler makes alone)
        pairs = [(case, seed) for case in heldout_cases(config) for seed in e.seeds]
        refs = np.stack([case.frame0(d.height, d.width) for case, _ in pairs])
        videos = RolloutBatch(sampler, [seed for _, seed in pairs]).rollout(
            refs, [[case.caption for case, _ in pairs]] * e.num_clips)
        results = []
        for (case, seed), ref, frames in zip(pairs, refs, videos):
            truth = scroll.make_scroll(ref, len(frames), case.direction, case.speed)
            r = drift.per_clip(frames, ref, sampler.new_frames_per_clip, truth, sampler.new_frames_per_clip)
            r.update(case=case.picture, seed=seed)
            results.append(r)
            if seed == e.seeds[0]:   # keep one rollout per model and start for looking at
                np.savez_compressed(os.path.join(workdir, "rollouts", f"{name}_{case.picture}.npz"),
                                    frames=frames, truth=truth)
        json.dump(results, open(path, "w"))
        out[name] = results
    return out


def add_earlier_passes(workdir: str, timings: dict) -> dict:
    """The experiment's time over every pass that reached the report: a re-run re-uses what earlier passes trained
    and rolled out (and takes ~0 s for it), so each stage's seconds are added to those in the last results.json."""
    path = os.path.join(workdir, "results.json")
    earlier = json.load(open(path)).get("timings", {}) if os.path.exists(path) else {}
    passes = int(earlier.get("passes", 1)) + 1 if earlier else 1
    out = {k: round(v + float(earlier.get(k, 0.0)), 1) for k, v in timings.items()}
    out["passes"] = passes
    return out


def run(config, workdir: str, report_path: str | None = None, command: str = "") -> dict:
    from svi_jax.experiments import drift_report

    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t = time.time()
    dataset = stage_data(config, workdir)
    timings["data"] = time.time() - t
    t = time.time()
    base_dir = stage_base(config, workdir, dataset)
    timings["base"] = time.time() - t
    t = time.time()
    runs = stage_loras(config, workdir, base_dir, dataset)
    timings["loras"] = time.time() - t
    t = time.time()
    rollouts = stage_rollouts(config, workdir, base_dir, runs)
    timings["rollouts"] = time.time() - t
    timings = add_earlier_passes(workdir, timings)
    clip_frames = int(config.data.num_frames) - 1
    text = drift_report.write(config, workdir, rollouts, runs, timings, report_path, command, clip_frames)
    return {"report": text, "timings": timings, "workdir": workdir}


def main(argv=None) -> int:
    from svi_jax import cli

    p = cli.ArgumentParser(prog="python -m svi_jax.experiments.drift", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter, config_overrides=True,
                           help_config="configs/drift.py",
                           epilog="--config.KEY=VALUE sets a field of configs/drift.py (e.g. "
                                  "--config.experiment.seeds=[0,1] --config.experiment.base_steps=8000)")
    p.add_argument("--workdir", required=True, help="where every stage writes (re-run to continue)")
    p.add_argument("--quick", action="store_true", help="the smoke version: a few steps, 3 clips, 2 starts x 1 seed")
    p.add_argument("--report", default=None, help="also write the tables here (plots and results.json beside it, "
                                                  "in drift/)")
    p.add_argument("--train_base", action="store_true",
                   help="pre-train the base (and fit the codec) in the workdir instead of using the shipped one")
    a = p.parse_args(argv)
    from configs import drift as drift_cfg
    from svi_jax.config_schema import check as check_config
    from svi_jax.logs import quiet_logs

    quiet_logs()
    config = drift_cfg.get_quick_config() if a.quick else drift_cfg.get_config()
    if a.train_base:
        config.experiment.base = ""
    for item in a.config_overrides:
        cli.apply_override(config, item)
    check_config(config)    # every key known (one line otherwise)
    cmd = ("python -m svi_jax.experiments.drift --workdir " + a.workdir + (" --quick" if a.quick else "")
           + (" --train_base" if a.train_base else "") + "".join(f" --config.{o}" for o in a.config_overrides))
    res = run(config, os.path.abspath(a.workdir), a.report, cmd)
    print(res["report"])
    return 0


if __name__ == "__main__":
    from svi_jax import cli as _cli

    raise SystemExit(_cli.run(main))
