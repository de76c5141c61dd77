"""``python -m svi_jax.train --config configs/shot.py --workdir DIR [--config.key=value ...]``."""
from __future__ import annotations

import json
import os
import sys

from svi_jax.errors import ConfigError
from svi_jax.logs import quiet_logs


def main(argv):
    from absl import flags

    from svi_jax.train.trainer import Trainer

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    from svi_jax import distributed

    distributed.initialize()  # multi-host (TPU pod, Slurm): from the environment; a no-op for one process
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    try:
        trainer = Trainer(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.compile()
    summary = trainer.run()
    trainer.close()
    print(json.dumps(summary))
    return 0


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file, e.g. configs/tiny.py (the embedded CPU default), configs/shot.py, "
        "configs/film.py. Override any field with --config.a.b=value (e.g. --config.train.num_steps=10).",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/, lora.safetensors. "
                        "Re-running with the same workdir resumes from its latest checkpoint.")
    flags.mark_flags_as_required(["config"])
