# Deprecated alias (one release): use svi_jax.train.checkpoints
from svi_jax.train.checkpoints import (  # noqa: F401
    REJECTED_DIR,
    CheckpointsUnusable,
    StreakGuard,
    data_state,
    make_manager,
    reject,
    restore_newest_good,
    seal,
    this_host_data_state,
    try_restore,
)
