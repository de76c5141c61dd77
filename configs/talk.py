"""SVI-Talk: Wan2.1-I2V-14B-480P + MultiTalk audio layers + wav2vec2, LoRA 128/128 (official scripts/*/svi_talk.sh).

  python convert/from_torch.py dit --src weights/Wan2.1-I2V-14B-480P --dst ckpt/dit_talk   # + multitalk.safetensors
  python convert/from_torch.py wav2vec2 --src weights/chinese-wav2vec2-base --dst ckpt/wav2vec2
  python -m svi_jax.sample --config configs/talk.py --image face.png --audio speech.wav --prompts prompts.txt \\
      --out talk.mp4 --lora svi-talk.safetensors --config.checkpoints.dit=ckpt/dit_talk \\
      --config.checkpoints.wav2vec2=ckpt/wav2vec2 --config.checkpoints.vae=... --config.checkpoints.t5=... \\
      --config.checkpoints.clip=...
  python -m svi_jax.train --config configs/talk.py --workdir runs/talk --config.data.videos=/data/talking_heads ...

Sampling: 81 frames per clip (all kept), 25 fps, 1 motion frame, reference padding, 50 Euler steps at shift 5,
guidance text 2 / audio 5. Training: only the LoRA (q,k,v,o,ffn.0,ffn.2) trains, the audio layers stay frozen;
audio windows zeroed with p 0.1; ERFT as Shot (y_error_num 3, 50 grids x 500, y/latent 0.9, noise 0.01,
clean 0.2). See docs/talk.md.
"""
import ml_collections

from configs import base
from configs.models import wan_i2v_14b


def talk_fields(c, p_drop_audio=0.1):
    """The MultiTalk switches of a config (shared by talk.py and talk_tiny.py)."""
    c.model.multitalk = True
    c.checkpoints.wav2vec2 = ""       # converted wav2vec2 (python convert/from_torch.py wav2vec2 ...)
    c.encoders.wav2vec2 = ml_collections.ConfigDict()
    c.talk = ml_collections.ConfigDict(dict(fps=25, cfg_text=2.0, cfg_audio=5.0, p_drop_audio=p_drop_audio))
    return c


def get_config():
    model = wan_i2v_14b.get_config()
    model.update(audio_in_dim=768, audio_layers=12, audio_window=5, audio_vae_scale=4, audio_hidden=512,
                 audio_tokens=32, audio_dim=768)
    c = base.train_config(model, "talk")
    c.data.update(num_frames=81, height=480, width=640, num_motion_frames=1, pad_mode="ref", p_motion=0.9)
    c.erft.update(p_clean=0.2, y_error_num=3, num_grids=50, capacity=500, p_image=0.9, p_latent=0.9, p_noise=0.01)
    return talk_fields(c)
