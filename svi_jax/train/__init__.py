"""ERFT LoRA training: ``python -m svi_jax.train --config configs/shot.py --workdir DIR [--config.key=value ...]``.

One pure, jitted, donated train step over a typed state (``svi_jax.train.state.TrainState``: frozen params,
trainable, optimizer state, ERFT banks, rng, step, non-finite counters), built once by
:func:`svi_jax.train.builder.build` for the trainer and for ``svi_jax.plan``. The package:

* ``config``: the config checks and what is derived from a config (latent shape, learning rate, optimizer);
* ``state``: :class:`TrainState`, :func:`init_state`, the frozen DiT (:func:`load_frozen_params`);
* ``step``: :func:`make_train_step`, the pure step;
* ``builder``: the state's shardings, the jitted step (:class:`TrainStep`) and :func:`build`;
* ``checkpoints``: verified orbax checkpoints (sha256 sums, fallback, streak guard);
* ``metrics``: ``metrics.jsonl`` (header row, rows) and TensorBoard;
* ``trainer``: :class:`Trainer`, the loop; ``cli`` / ``__main__``: the command.

Checkpoints hold everything that changes (:meth:`TrainState.checkpoint`: the LoRA or trained DiT, optimizer state,
banks, RNG, step) and the data iterator's position; re-running the same command resumes exactly. Metrics go to
``metrics.jsonl`` and TensorBoard; the LoRA is exported as SVI-format safetensors.
"""
from svi_jax.errors import ConfigError  # noqa: F401 (API: svi_jax.train.ConfigError)
from svi_jax.logs import quiet_logs  # noqa: F401 (API)
from svi_jax.train.builder import (  # noqa: F401
    Built,
    TrainStep,
    build,
    encoder_configs,
    init_sharded,
    sharded_train_step,
    state_shardings,
    state_specs,
)
from svi_jax.train.cli import _define_flags, main  # noqa: F401
from svi_jax.train.config import is_full, latent_shape, learning_rate, make_optimizer, validate_config  # noqa: F401
from svi_jax.train.metrics import METRICS_FILE, resolved_attention, run_header  # noqa: F401
from svi_jax.train.state import TrainState, init_state, load_frozen_params  # noqa: F401
from svi_jax.train.step import make_train_step  # noqa: F401
from svi_jax.train.trainer import Trainer  # noqa: F401
