"""Wan2.2-I2V-A14B: two experts, each this DiT (the Wan2.1-14B shape, in_dim 36, no CLIP branch).

Wan2.2 ``wan/configs/wan_i2v_A14B.py``: dim 5120, 40 layers, 40 heads, ffn 13824, freq 256, qk_norm,
cross_attn_norm, eps 1e-6; the high-noise expert runs while t >= 0.900 * 1000 (SVI 2.0 Pro: 0.875), shift 5,
40 steps, guidance (3.5, 3.5). ``model.py``: no ``img_emb`` / ``k_img`` / ``v_img``; y on the channels as Wan2.1 I2V.
"""
import ml_collections

from configs.models import wan_i2v_14b

#: Wan2.2's own sampling settings of this model (wan_i2v_A14B.py); SVI 2.0 Pro's are in configs/pro.py.
WAN22 = dict(boundary=0.900, sample_shift=5.0, sample_steps=40, guide_scale_low=3.5, guide_scale_high=3.5)


def get_config() -> ml_collections.ConfigDict:
    c = wan_i2v_14b.get_config()
    c.image_embedding = False
    return c
