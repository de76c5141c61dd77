"""Deprecated alias (one release): use :mod:`svi_jax.denoise_experts` (the Wan2.2 two-expert denoiser).
The same module object under both names, so attributes and patches are shared."""
import sys

from svi_jax import denoise_experts as _new

sys.modules[__name__] = _new
