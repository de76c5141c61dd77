"""SVI-Talk at tiny size on a CPU: random tiny DiT with MultiTalk layers, random tiny wav2vec2, patch "VAE",
random tiny UMT5/CLIP (the same code path as configs/talk.py).

  python -m svi_jax.sample --config configs/talk_tiny.py --image face.png --audio speech.wav --prompt "a person is
      talking" --out talk.mp4 --num_steps 4
"""
import ml_collections

from configs import drift
from configs.talk import talk_fields


def get_config():
    c = drift.get_config()
    del c["experiment"]
    c.name = "talk_tiny"
    c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64, audio_in_dim=16, audio_layers=2, audio_window=5,
                   audio_vae_scale=4, audio_hidden=24, audio_tokens=4, audio_dim=12)
    c.data.update(num_frames=17, height=32, width=48, batch_size=1, num_workers=1, prefetch=2, num_motion_frames=1,
                  pad_mode="ref")
    c.lora.update(rank=8, alpha=8)
    c.erft.update(capacity=8, warmup_steps=5)
    c.optim.lr = 1e-3
    c.train.update(num_steps=20, ckpt_every=10, keep=2)
    talk_fields(c)
    c.encoders.wav2vec2 = ml_collections.ConfigDict(dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8, 8),
        conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4))
    return c
