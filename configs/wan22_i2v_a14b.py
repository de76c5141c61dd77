"""Deprecated alias (one release): use configs.models.wan22_i2v_a14b (the model presets live in configs/models/)."""
from configs.models.wan22_i2v_a14b import get_config, WAN22  # noqa: F401
