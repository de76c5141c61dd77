"""The embedded default: a tiny Wan-shaped I2V model trained with ERFT on generated data, on a CPU, in minutes.

  python -m svi_jax.train --config configs/tiny.py --workdir runs/tiny

Same code path as shot.py: synthetic clips (scikit-image pictures under smooth camera motion) -> TFDS build ->
clip sampling (1 motion frame, reference padding) -> Wan VAE / UMT5 / CLIP (random, tiny width) inside the jitted
step -> ERFT (the official Shot probabilities, 50 grids, small capacity) -> LoRA on the official targets.
"""
import ml_collections

from configs import base, wan_i2v_14b


def get_config():
    model = wan_i2v_14b.get_config()
    model.update(dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32, text_len=32,
                 image_dim=32, param_dtype="float32", dtype="float32", remat_policy="none")
    c = base.train_config(model, "tiny")
    c.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True],
                                                    latents_mean=[0.0] * 16, latents_std=[1.0] * 16))
    c.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                   num_layers=2, num_buckets=8, max_distance=16, text_len=32))
    c.encoders.clip = ml_collections.ConfigDict(dict(image_size=28, patch_size=14, dim=32, mlp_dim=64, num_heads=2,
                                                     num_layers=2))
    c.data.update(num_frames=17, height=48, width=80, batch_size=1, num_workers=2, synthetic=12)
    c.lora.update(rank=8, alpha=8)
    c.erft.capacity = 8
    c.erft.warmup_steps = 5
    c.optim.lr = 1e-3
    c.train.update(num_steps=60, ckpt_every=20, keep=2)
    return c
