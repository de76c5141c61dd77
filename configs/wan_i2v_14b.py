"""Deprecated alias (one release): use configs.models.wan_i2v_14b (the model presets live in configs/models/)."""
from configs.models.wan_i2v_14b import get_config  # noqa: F401
