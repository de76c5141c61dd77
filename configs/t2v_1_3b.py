"""A smaller real-size run: Wan2.1-T2V-1.3B with ERFT (no image branch: no image error), 81x480x832."""
from configs import base
from configs.models import wan_t2v_1_3b


def get_config():
    c = base.train_config(wan_t2v_1_3b.get_config(), "t2v_1_3b")
    c.data.update(num_frames=81, height=480, width=832)
    c.erft.p_image = 0.0
    return c
