"""The embedded default: ERFT fine-tuning of a small Wan-shaped I2V model on generated data, on a CPU, in minutes.

  python -m svi_jax.train --config configs/tiny.py --workdir runs/tiny
  python -m svi_jax.sample --config configs/tiny.py --image ref.png --prompts prompts.txt --out out.mp4 \\
      --lora runs/tiny --num_steps 10 --cfg_scale 1

Same code path as shot.py: generated clips (scikit-image pictures scrolling in a captioned direction and speed,
svi_jax/data/scroll.py) -> TFDS build -> clip sampling (1 motion frame, reference padding) -> encoders inside the
jitted step -> ERFT (the official Shot probabilities, 50 grids, small capacity) -> LoRA on the official targets ->
SVI-format LoRA file.

The frozen base is a pre-trained Wan-shaped I2V DiT (dim 192, 4 layers; :func:`model_config`) with its PCA codec
(z 16, 2x2 space, 4x time; :func:`encoders`), shipped with the package in svi_jax/assets/tiny_base (trained by the
drift experiment, configs/drift.py and docs/drift.md, which builds on this file's model); the text and image
encoders are random tiny UMT5/CLIP. ``--config.checkpoints.dit=''`` trains on a random base instead.
"""
import os

import ml_collections

import svi_jax
from configs import base
from configs.models import wan_i2v_14b

TINY_BASE = os.path.join(os.path.dirname(svi_jax.__file__), "assets", "tiny_base")


def model_config():
    """The tiny Wan-shaped I2V DiT: Wan2.1-I2V-14B's layout at width 192, 4 layers, float32."""
    model = wan_i2v_14b.get_config()
    model.update(dim=192, num_layers=4, num_heads=4, ffn_dim=512, freq_dim=64, text_dim=32, text_len=80,
                 image_dim=32, in_dim=16 * 2 + 4, out_dim=16, param_dtype="float32", dtype="float32",
                 remat_policy="none")
    return model


def encoders(c, codec_path: str):
    """The tiny base's encoders on config ``c``: the PCA patch codec at ``codec_path``, random tiny UMT5 / CLIP."""
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=2, temporal=4, components=16,
                                                    basis=codec_path))
    c.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                   num_layers=2, num_buckets=8, max_distance=16, text_len=80))
    c.encoders.clip = ml_collections.ConfigDict(dict(image_size=28, patch_size=14, dim=32, mlp_dim=64, num_heads=2,
                                                     num_layers=2))


def get_config():
    c = base.train_config(model_config(), "tiny")
    encoders(c, os.path.join(TINY_BASE, "codec.npz"))
    c.checkpoints.dit = os.path.join(TINY_BASE, "dit")
    c.data.update(num_frames=17, height=32, width=48, batch_size=1, num_workers=2, prefetch=2, synthetic=12)
    c.lora.update(rank=8, alpha=8)
    # Flow shift 1 (training timesteps, the ERFT grids and sampling), the shift the base was trained at: shift grows
    # with resolution (SD3, Wan: 5 at 32k tokens); at 480 tokens shift 5 puts most training on near-pure noise.
    c.erft.update(capacity=8, warmup_steps=5, shift=1.0)
    # 2e-4: at batch 1, 1e-3 pulls the 60-step LoRA off the base (first frame 33 -> 21 dB, docs/sampling.md)
    c.optim.lr = 2e-4
    c.train.update(num_steps=60, ckpt_every=20, keep=2)
    return c
