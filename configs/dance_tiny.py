"""SVI-Dance at CPU size (tests, docs/dance.md's frame strip): random tiny DiT with a pose embedding, the exact
patch "VAE" at 8x8 (so latents are H/8 as the Wan VAE's, which the pose embedding's /16 token grid needs), random
tiny UMT5/CLIP, synthetic dancing-skeleton clips.

  python -m svi_jax.train --config configs/dance_tiny.py --workdir runs/dance_tiny
  python -m svi_jax.sample --config configs/dance_tiny.py --image ref.png --pose_dir poses/ --prompt "dance" \
      --lora runs/dance_tiny/adapter --num_clips 3 --num_steps 4 --out dance.mp4
"""
import ml_collections

from configs import dance, tiny


def get_config():
    c = tiny.get_config()
    c.name = "dance_tiny"
    c.checkpoints.dit = ""                  # random base (the shipped tiny base has no 8x8 patch layout)
    c.erft.shift = 5.0                      # the official shift (the shipped tiny base's 1 is for its own model)
    z = 4 * 8 * 8 * 3
    c.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64, freq_dim=32, text_len=16, in_dim=2 * z + 4,
                   out_dim=z)
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=8, temporal=4, scale=0.5))
    c.encoders.t5.update(text_len=16, num_layers=1)
    c.encoders.clip.update(num_layers=1)
    c.data.update(num_frames=9, height=32, width=48, batch_size=1, num_workers=1, prefetch=1, synthetic=4)
    c.lora.update(rank=4, alpha=4)
    c.erft.update(capacity=4, warmup_steps=2)
    c.train.update(num_steps=4, ckpt_every=2, keep=1)
    return dance.dance_fields(c)
