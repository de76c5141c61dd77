"""Wan2.2-T2V-A14B: two experts, each this DiT (the Wan2.1-T2V-14B shape).

Wan2.2 ``wan/configs/wan_t2v_A14B.py``: dim 5120, 40 layers, 40 heads, ffn 13824; boundary 0.875, shift 12,
40 steps, guidance (low 3.0, high 4.0).
"""
import ml_collections

from configs.models import wan_t2v_14b

WAN22 = dict(boundary=0.875, sample_shift=12.0, sample_steps=40, guide_scale_low=3.0, guide_scale_high=4.0)


def get_config() -> ml_collections.ConfigDict:
    return wan_t2v_14b.get_config()
