"""The drift experiment (docs/drift.md): a small Wan-shaped I2V base, then LoRAs with and without ERFT.

  python -m svi_jax.experiments.drift --workdir runs/drift            # the full experiment (see docs/drift.md)
  python -m svi_jax.experiments.drift --workdir runs/drift_q --quick  # the smoke version the tests run

Latents: the fixed invertible patch transform (svi_jax/models/patch_vae.py, 4x time packing as Wan, 4x4 space ->
192 channels), so the drift measured is the DiT's and the chaining's, not a lossy autoencoder's. Text and image
encoders: random tiny UMT5 / CLIP (frozen features of the caption bytes and the first frame).
"""
import ml_collections

from configs import base, wan_i2v_14b


def get_config():
    model = wan_i2v_14b.get_config()
    model.update(dim=96, num_layers=4, num_heads=4, ffn_dim=256, freq_dim=64, text_dim=32, text_len=48,
                 image_dim=32, in_dim=192 * 2 + 4, out_dim=192, param_dtype="float32", dtype="float32",
                 remat_policy="none")
    c = base.train_config(model, "drift")
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=4, temporal=4, scale=0.5))
    c.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                   num_layers=2, num_buckets=8, max_distance=16, text_len=48))
    c.encoders.clip = ml_collections.ConfigDict(dict(image_size=28, patch_size=14, dim=32, mlp_dim=64, num_heads=2,
                                                     num_layers=2))
    c.data.update(num_frames=17, height=32, width=48, batch_size=4, num_workers=2, prefetch=4)
    c.lora.update(rank=16, alpha=16)
    c.erft.update(capacity=24, warmup_steps=50)
    c.optim.lr = 1e-3
    c.train.update(ckpt_every=500, keep=1)

    c.experiment = ml_collections.ConfigDict(dict(
        train_images=["astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
                      "immunohistochemistry", "colorwheel"],
        heldout_images=["camera", "brick"],
        num_train_clips=64, data_frames=33, seed=0,
        base_steps=2000, base_lr=1e-3, lora_steps=500, lora_lr=5e-4,
        num_clips=20, seeds=[0, 1, 2], sample_steps=20, cfg_scale=1.0,
        variants=["plain", "erft", "no_image_error", "no_latent_noise_error", "handcrafted"],
        film_variants=["plain", "erft"],
    ))
    return c


def get_quick_config():
    """The smoke version: a few steps, 3 clips, 1 seed."""
    c = get_config()
    c.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    c.experiment.update(num_train_clips=8, base_steps=6, lora_steps=4, num_clips=3, seeds=[0], sample_steps=3,
                        variants=["erft"], film_variants=["erft"], heldout_images=["camera"])
    c.erft.update(capacity=4, warmup_steps=2)
    c.data.update(batch_size=1, num_workers=1, prefetch=1)
    return c
