"""Wan2.1-T2V-1.3B DiT: dim 1536, 30 layers, 12 heads, ffn 8960."""
from configs.models import wan_t2v_14b


def get_config():
    c = wan_t2v_14b.get_config()
    c.update(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960)
    return c
