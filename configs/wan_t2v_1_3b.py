"""Deprecated alias (one release): use configs.models.wan_t2v_1_3b (the model presets live in configs/models/)."""
from configs.models.wan_t2v_1_3b import get_config  # noqa: F401
