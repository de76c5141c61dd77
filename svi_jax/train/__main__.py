"""``python -m svi_jax.train --config configs/shot.py --workdir DIR [--config.key=value ...]``."""
from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1
from svi_jax.train import cli as train_cli


def _define_flags():
    from absl import flags

    train_cli._define_flags()
    flags.adopt_module_key_flags(train_cli)   # --help lists them as this command's flags


if __name__ == "__main__":
    cli.absl_run(train_cli.main, _define_flags)
