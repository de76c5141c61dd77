"""SVI-Shot: Wan2.1-I2V-14B-480P, 81x480x832, LoRA 128/128, 1 motion frame with reference padding, p_clean 0.2.

  python -m svi_jax.train --config configs/shot.py --workdir runs/shot \
      --config.checkpoints.dit=ckpt/dit --config.checkpoints.vae=ckpt/vae --config.checkpoints.t5=ckpt/t5 \
      --config.checkpoints.clip=ckpt/clip --config.data.videos=/data/mixkit

On v5p-64 (data 8 x fsdp 8) this pixel step (the frozen encoders' program, then the DiT step) needs 86.98 GB/chip
at K = 500 and fits; from a latent cache (python -m svi_jax.data cache ..., then --config.data.cache=DIR) the DiT
step alone needs 82.9 GB (docs/scaling.md).
"""
from configs import base
from configs.models import wan_i2v_14b


def get_config():
    c = base.train_config(wan_i2v_14b.get_config(), "shot")
    c.data.update(num_frames=81, height=480, width=832, num_motion_frames=1, pad_mode="ref", p_motion=0.9)
    c.erft.p_clean = 0.2
    return c
