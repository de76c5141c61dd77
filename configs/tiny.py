"""The embedded default: ERFT fine-tuning of a small Wan-shaped I2V model on generated data, on a CPU, in ~1 minute.

  python -m svi_jax.train --config configs/tiny.py --workdir runs/tiny

Same code path as shot.py: synthetic clips (scikit-image pictures under smooth camera motion) -> TFDS build -> clip
sampling (1 motion frame, reference padding) -> encoders inside the jitted step -> ERFT (the official Shot
probabilities, 50 grids, small capacity) -> LoRA on the official targets -> SVI-format LoRA file.

The frozen base is the drift experiment's pre-trained DiT, shipped with the package (svi_jax/assets/tiny_base, 3 MB;
see docs/drift.md), so the LoRA fine-tunes a model that has learned something. Like that experiment it uses the exact
patch "VAE" and random tiny UMT5/CLIP; the Wan VAE path is covered by the tests (tests/test_vae.py,
tests/test_pipeline.py). ``--config.checkpoints.dit=''`` trains on a random base instead.
"""
import os

import svi_jax
from configs import drift

TINY_BASE = os.path.join(os.path.dirname(svi_jax.__file__), "assets", "tiny_base")


def get_config():
    c = drift.get_config()
    del c["experiment"]
    c.name = "tiny"
    c.checkpoints.dit = TINY_BASE
    c.data.update(num_frames=17, height=32, width=48, batch_size=1, num_workers=2, prefetch=2, synthetic=12)
    c.lora.update(rank=8, alpha=8)
    c.erft.update(capacity=8, warmup_steps=5)
    c.optim.lr = 1e-3
    c.train.update(num_steps=60, ckpt_every=20, keep=2)
    return c
