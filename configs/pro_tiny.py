"""SVI 2.0 Pro at tiny size on a CPU: two random Wan2.2-shaped experts (no CLIP branch), the patch codec, a random
tiny UMT5, generated scrolling clips.

  python -m svi_jax.train --config configs/pro_tiny.py:high --workdir runs/pro_tiny_high
  python -m svi_jax.sample --config configs/pro_tiny.py --chain pro --image ref.png --prompt "a boat" \\
      --out out.mp4 --num_clips 3 --num_steps 10 --lora_high runs/pro_tiny_high
"""
import ml_collections

from configs import base, pro


def get_config(expert: str = "high"):
    model = ml_collections.ConfigDict(dict(
        model_type="i2v", image_embedding=False, dim=32, num_layers=2, num_heads=2, ffn_dim=64, freq_dim=32,
        text_dim=32, text_len=16, in_dim=2 * 48 + 4, out_dim=48, patch_size=(1, 2, 2), eps=1e-6, qk_norm=True,
        cross_attn_norm=True, param_dtype="float32", dtype="float32", attention="xla", remat_policy="none",
        scan_layers=True, lora_scale=1.0))
    c = base.train_config(model, f"pro_tiny_{expert}")
    c.encoders.vae = ml_collections.ConfigDict(dict(kind="patch", spatial=2, temporal=4, scale=0.5))
    c.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                   num_layers=1, num_buckets=8, max_distance=16, text_len=16))
    c.data.update(num_frames=9, height=16, width=16, batch_size=1, num_workers=1, prefetch=1, synthetic=4)
    c.lora.update(rank=4, alpha=4)
    c.erft.update(capacity=4, warmup_steps=2)
    c.optim.lr = 1e-3
    c.train.update(num_steps=4, ckpt_every=2, keep=2)
    return pro.finish(c, expert or "high")
