"""SVI 2.0 Pro on Wan2.2-I2V-A14B: sampling (``--chain pro``) and ERFT training of one expert's LoRA.

  python convert/from_torch.py wan22 --src Wan2.2-I2V-A14B --dst ckpt/wan22        # both experts
  python -m svi_jax.sample --config configs/pro.py --chain pro --image ref.png --prompts prompts.txt \\
      --out out.mp4 --lora_high SVI_Wan2.2_high.safetensors --lora_low SVI_Wan2.2_low.safetensors \\
      --config.checkpoints.dit=ckpt/wan22 --config.checkpoints.vae=ckpt/vae --config.checkpoints.t5=ckpt/t5
  python -m svi_jax.train --config configs/pro_high.py --workdir runs/pro_high --config.checkpoints.dit=ckpt/wan22 \\
      ... --config.data.videos=/data/clips              # and configs/pro_low.py (or configs/pro.py:low)

No official Pro training code exists: see svi_jax/pro_train.py for which choices are ours.
"""
import ml_collections

from configs import base
from configs.models import wan22_i2v_a14b
from svi_jax.pro import PRO_DEFAULTS


def pro_fields(expert: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        expert=expert,                               # the expert a training run trains ('high' | 'low')
        boundary=PRO_DEFAULTS["boundary"],           # high-noise expert while t >= 0.875 * 1000 (pipeline L226)
        grid_steps=PRO_DEFAULTS["num_steps"],        # the inference grid the ERFT banks' grids are taken from
        overlap=PRO_DEFAULTS["overlap"],             # sampling: frames dropped from each later clip (script: 4)
        motion_latents=PRO_DEFAULTS["motion_latents"],
        p_first_clip=0.0))                           # training: share of clip-0 conditioning [x0[:1], zeros]


def finish(c, expert: str):
    """The Pro parts of a training config ``c`` whose model is a Wan2.2 I2V expert."""
    from svi_jax.pro_train import apply_expert

    c.pro = pro_fields(expert)
    c.data.update(num_motion_frames=1, anchor="outside")
    c.erft.update(y_error_start=1, y_error_num=c.pro.motion_latents)   # the image error on the motion latent
    apply_expert(c)
    c.sample = ml_collections.ConfigDict(dict(cfg_scale=PRO_DEFAULTS["cfg_scale"], fps=15.0))  # script L213
    return c


def get_config(expert: str = "high"):
    c = base.train_config(wan22_i2v_a14b.get_config(), f"pro_{expert}")
    c.data.update(num_frames=81, height=480, width=832, p_motion=0.9)
    c.erft.p_clean = 0.2
    return finish(c, expert or "high")
