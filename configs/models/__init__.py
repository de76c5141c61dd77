"""Model presets: the DiT architecture of each Wan checkpoint (``get_config()`` -> the ``config.model`` section)."""
