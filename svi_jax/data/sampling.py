"""Deprecated alias (one release): use :mod:`svi_jax.data.windows` (the official training-clip windows).
The same module object under both names, so attributes and patches are shared."""
import sys

from svi_jax.data import windows as _new

sys.modules[__name__] = _new
