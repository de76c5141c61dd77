"""Deprecated alias (one release): use :mod:`svi_jax.denoise` (the denoiser: one clip's whole flow-matching loop).
The same module object under both names, so attributes and patches are shared."""
import sys

from svi_jax import denoise as _new

sys.modules[__name__] = _new
