"""Deprecated alias (one release): use :mod:`svi_jax.model_dirs` (converted model directories; training checkpoints are svi_jax.train.checkpoints).
The same module object under both names, so attributes and patches are shared."""
import sys

from svi_jax import model_dirs as _new

sys.modules[__name__] = _new
