"""Wan2.1-T2V-14B DiT: as I2V-14B without the image branch (in_dim 16)."""
from configs.models import wan_i2v_14b


def get_config():
    c = wan_i2v_14b.get_config()
    c.model_type = "t2v"
    c.in_dim = 16
    return c
