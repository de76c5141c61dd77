"""Deprecated alias (one release): use svi_jax.models.patch_codec (the patch codec is not a VAE)."""
# Deprecated alias (one release): use svi_jax.models.patch_codec
from svi_jax.models.patch_codec import (PatchCodecConfig, PatchVAEConfig, decode, decode_latents,  # noqa: F401
                                        encode, encode_latents, fit_pca, load_params)
