"""``python -m svi_jax.train --config configs/shot.py --workdir DIR [--config.key=value ...]``."""
from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1
from svi_jax.train.cli import _define_flags, main

if __name__ == "__main__":
    cli.absl_run(main, _define_flags)
