"""svi-jax: Stable Video Infinity (Error-Recycling Fine-Tuning of Wan2.1) on JAX/Flax."""
__version__ = "0.1.0"

from svi_jax.loading import load  # noqa: E402,F401
