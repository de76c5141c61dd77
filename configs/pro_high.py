"""SVI 2.0 Pro: ERFT LoRA of the high-noise expert (t >= 875); see configs/pro.py."""
from configs import pro


def get_config():
    return pro.get_config("high")
