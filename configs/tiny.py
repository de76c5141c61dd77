"""The embedded default: ERFT fine-tuning of a small Wan-shaped I2V model on generated data, on a CPU, in minutes.

  python -m svi_jax.train --config configs/tiny.py --workdir runs/tiny
  python -m svi_jax.sample --config configs/tiny.py --image ref.png --prompts prompts.txt --out out.mp4 \\
      --lora runs/tiny --num_steps 10 --cfg_scale 1

Same code path as shot.py: generated clips (scikit-image pictures scrolling in a captioned direction and speed,
svi_jax/data/scroll.py) -> TFDS build -> clip sampling (1 motion frame, reference padding) -> encoders inside the
jitted step -> ERFT (the official Shot probabilities, 50 grids, small capacity) -> LoRA on the official targets ->
SVI-format LoRA file.

The frozen base is the drift experiment's pre-trained Wan-shaped I2V DiT (dim 192, 4 layers) with its PCA codec
(z 16, 2x2 space, 4x time), shipped with the package in svi_jax/assets/tiny_base (see docs/drift.md); the text
and image encoders are random tiny UMT5/CLIP. ``--config.checkpoints.dit=''`` trains on a random base instead.
"""
import os

from configs import base, drift

TINY_BASE = drift.TINY_BASE


def get_config():
    c = base.train_config(drift.model_config(), "tiny")
    drift.encoders(c, os.path.join(TINY_BASE, "codec.npz"))
    c.checkpoints.dit = os.path.join(TINY_BASE, "dit")
    c.data.update(num_frames=17, height=32, width=48, batch_size=1, num_workers=2, prefetch=2, synthetic=12)
    c.lora.update(rank=8, alpha=8)
    c.erft.update(capacity=8, warmup_steps=5, shift=1.0)    # the shift the base was trained at (configs/drift.py)
    c.optim.lr = 1e-3
    c.train.update(num_steps=60, ckpt_every=20, keep=2)
    return c
