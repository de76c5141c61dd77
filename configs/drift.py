"""The drift experiment (docs/drift.md): a small Wan-shaped I2V base, then LoRAs with and without ERFT.

  python -m svi_jax.experiments.drift --workdir runs/drift            # the full experiment (see docs/drift.md)
  python -m svi_jax.experiments.drift --workdir runs/drift_q --quick  # the smoke version the tests run

Data: pictures scrolling on a torus (svi_jax/data/scroll.py), direction and speed named in the caption, so the
ground-truth continuation is known exactly at any length. Latents: Wan's 4x time packing and a 2x2 space patch,
projected on 16 principal components (svi_jax/models/patch_vae.py: a linear autoencoder fitted in closed form,
33 dB on held-out clips), then the DiT's 2x2 patch: a token carries 2x2 latents x 16 channels = 64 numbers, as
in Wan, into width 192. Text and image encoders: random tiny UMT5 / CLIP (frozen features of the caption bytes and
the first frame): the model and encoders of configs/tiny.py. The base is pre-trained on every weight
(``--train_base``) or taken from the package (svi_jax/assets/tiny_base: DiT + codec.npz).
"""
import os

import ml_collections

from configs import base, tiny

TINY_BASE = tiny.TINY_BASE
model_config = tiny.model_config   # the tiny Wan-shaped I2V DiT and its encoders (configs/tiny.py)
encoders = tiny.encoders


def get_config():
    c = base.train_config(model_config(), "drift")
    encoders(c, os.path.join(TINY_BASE, "codec.npz"))
    c.data.update(num_frames=17, height=32, width=48, batch_size=4, num_workers=2, prefetch=4)
    c.lora.update(rank=16, alpha=16)
    # Flow shift 1 (training timesteps, the ERFT grids and sampling): shift grows with resolution (SD3, Wan: 5 at
    # 32k tokens); at 480 tokens shift 5 puts most training on near-pure noise and leaves a last Euler step of
    # sigma 0.36 -> 0 at 10 steps, which is what made the earlier tiny base paint colour noise.
    c.erft.update(capacity=24, warmup_steps=50, shift=1.0)
    c.optim.lr = 1e-3
    c.train.update(ckpt_every=250, keep=2)

    c.experiment = ml_collections.ConfigDict(dict(
        base=TINY_BASE,                 # '' or --train_base: pre-train the base (and fit the codec) in the workdir
        base_init="",                   # pre-training starts from this base dir ('' = random init)
        base_pad_mode="mix", base_motion_frames=5, base_p_motion=0.3,   # the base's conditioning mix
        base_schedule="constant",       # or 'cosine': the base's learning rate decays to 0 over base_steps
        heldout_images=["camera", "brick", "rocket", "stereo_motorcycle"],
        num_train_clips=384, data_frames=33, seed=0,
        codec_clips=192, base_steps=6000, base_lr=1e-3, base_batch=4, lora_steps=300, lora_lr=5e-4,
        num_clips=20, seeds=[0, 1, 2, 3, 4], sample_steps=10, cfg_scale=1.0,
        variants=["plain", "erft", "no_image_error", "no_latent_noise_error", "handcrafted"],
        film_variants=["plain", "erft"],
        capacities=[],                  # bank-size sweep (Tab. 8): extra ERFT LoRAs with erft.capacity = K
        strengths=[],                   # LoRA strength at inference (Tab. 7 bottom), applied to the ERFT LoRA
        bootstrap=2000,
    ))
    return c


def get_quick_config():
    """The smoke version: a random base trained a few steps, 3 clips, 2 starts x 1 seed."""
    c = get_config()
    c.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    c.experiment.update(base="", num_train_clips=8, codec_clips=8, base_steps=6, lora_steps=4, num_clips=3,
                        seeds=[0], sample_steps=3, variants=["plain", "erft"], film_variants=["erft"],
                        heldout_images=["camera", "brick"], capacities=[2], strengths=[0.5], bootstrap=200)
    c.erft.update(capacity=4, warmup_steps=2)
    c.data.update(batch_size=1, num_workers=1, prefetch=1)
    return c
