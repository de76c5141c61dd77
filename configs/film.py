"""SVI-Film: as Shot but 5 motion frames, zero padding, p_clean 0.5."""
from configs import shot


def get_config():
    c = shot.get_config()
    c.name = "film"
    c.data.update(num_motion_frames=5, pad_mode="zero")
    c.erft.p_clean = 0.5
    return c
