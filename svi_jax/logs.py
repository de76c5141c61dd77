"""Logging set-up shared by every command (no svi_jax imports)."""
from __future__ import annotations

import logging


def quiet_logs():
    """Our INFO logs on stderr; absl/orbax/tfds chatter only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    ours = logging.getLogger("svi_jax")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(h)
        ours.propagate = False
