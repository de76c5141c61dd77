"""The frame strip of docs/dance.md: a tiny SVI-Dance run (configs/dance_tiny.py) driven by a drawn skeleton stream.

  python -m svi_jax.experiments.dance_strip --out docs/dance/strip.png [--workdir runs/dance_strip]

A waving stick figure (OpenPose-ordered keypoints, drawn with :mod:`svi_jax.data.skeleton`) -> a 14-frame pose stream
(shorter than two clips, so the windows loop) -> a few training steps of the tiny dance model on synthetic clips
paired with that stream (by default every weight of the random tiny base and the pose module, so it learns
something in minutes; ``--trainable lora`` runs the SVI-Dance recipe) -> 3 chained clips. The strip shows, per column, the pose
frame of the window and the generated frame. The tiny model is random-initialised and trained for seconds, so its
frames show the pipeline running, not dance quality.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np

H, W = 32, 48


def stick_figure(t: float, height: int = 96, width: int = 144) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints [1, 134, 2] pixels, scores [1, 134])`` of a figure waving its arms at phase ``t``."""
    cx, s = width / 2, height / 96
    a = np.sin(2 * np.pi * t)
    body = {0: (0, 12), 1: (0, 24), 2: (-10, 25), 3: (-18, 36 - 12 * a), 4: (-24, 46 - 26 * a), 5: (10, 25),
            6: (18, 36 + 12 * a), 7: (24, 46 + 26 * a), 8: (-7, 52), 9: (-9 - 4 * a, 68), 10: (-10 - 6 * a, 84),
            11: (7, 52), 12: (9 + 4 * a, 68), 13: (10 + 6 * a, 84), 14: (-3, 10), 15: (3, 10), 16: (-6, 12),
            17: (6, 12)}
    kp = np.zeros((134, 2))
    sc = np.zeros(134)
    for i, (x, y) in body.items():
        kp[i] = (cx + x * s, y * s)
        sc[i] = 0.9
    for j, ankle in ((18, 13), (21, 10)):                  # feet: big toe, small toe, heel per foot
        kp[j:j + 3] = kp[ankle] + np.array([[4, 4], [-3, 4], [0, 2]]) * s
        sc[j:j + 3] = 0.9
    for start, wrist in ((92, 7), (113, 4)):             # hands: 21 points fanning out of the wrist
        ang = np.linspace(-1.2, 1.2, 20)
        kp[start] = kp[wrist]
        kp[start + 1:start + 21] = kp[wrist] + np.stack([np.sin(ang), -np.cos(ang)], 1) * 5 * s
        sc[start:start + 21] = 0.9
    return kp[None], sc[None]


def pose_stream(n: int = 14) -> np.ndarray:
    from svi_jax.data.skeleton import draw_pose

    return np.stack([draw_pose(*stick_figure(i / n), 96, 144) for i in range(n)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/dance/strip.png")
    ap.add_argument("--workdir", default="runs/dance_strip")
    ap.add_argument("--train_steps", type=int, default=80)
    ap.add_argument("--trainable", default="full", choices=["full", "lora"],
                    help="full: every DiT weight + the pose module (a random base learns something in minutes); "
                         "lora: the SVI-Dance recipe (LoRA + pose module on a frozen base)")
    ap.add_argument("--num_steps", type=int, default=8)
    args = ap.parse_args(argv)

    from PIL import Image

    from svi_jax import dance
    from svi_jax import sample as S
    from svi_jax import train as train_lib
    from svi_jax.data import synthetic
    from svi_jax.data.scan import pose_path
    from svi_jax.data.video import write_video
    from svi_jax.data.__main__ import load_config_file

    config = load_config_file("configs/dance_tiny.py")
    config.train.update(num_steps=args.train_steps, ckpt_every=args.train_steps, async_checkpoints=False)
    config.optim.lr = 1e-3
    config.train.trainable = args.trainable
    poses = pose_stream()
    videos = os.path.join(args.workdir, "videos")
    if not os.path.isdir(videos):
        synthetic.write_dataset(videos, num_videos=4, num_frames=17, height=H, width=W, seed=1)
        for v in sorted(glob.glob(os.path.join(videos, "*", "*.mp4"))):
            write_video(pose_path(v), dance.resize_and_pad(np.concatenate([poses, poses[:3]]), H, W), fps=16.0,
                        crf=0, pix_fmt="yuv444p")
    config.data.videos = videos
    trainer = train_lib.Trainer(config, os.path.join(args.workdir, "train"))
    summary = trainer.run(progress=False)
    trainer.close()
    stream = dance.PoseStream(poses, int(config.data.num_frames), H, W)
    if args.trainable == "full":
        config.checkpoints.dit = summary["dit_dir"]
    sampler = S.LongVideoSampler(config, lora=summary.get("lora_file"), num_steps=args.num_steps, cfg_scale=2.0,
                                 streams=[stream])
    ref = synthetic.make_sequence(synthetic.dataset_specs(1, 7)[0].image, 1, H, W, 7)[0]
    video = sampler.rollout(ref, ["the person is dancing"] * 3)
    # the pose frame of every stitched frame: clip k's window, the last clip keeping its final frame
    T, m = sampler.T, sampler.m
    idx = np.concatenate([stream.window(k)[0][: T - m] for k in range(3)] + [stream.window(2)[0][T - m:]])
    cols = list(range(0, len(video), 2))
    top = np.concatenate([stream.frames[idx[c]] for c in cols], axis=1)
    bottom = np.concatenate([video[c] for c in cols], axis=1)
    strip = np.concatenate([top, bottom], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"{len(video)} frames ({len(cols)} shown), {summary.get('end_step')} training steps -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
