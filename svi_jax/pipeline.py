"""Deprecated alias (one release): the frozen encoders moved to :mod:`svi_jax.encoders`, the training conditioners to
:mod:`svi_jax.conditioners`, the data factory to :mod:`svi_jax.data.factory`."""
# Deprecated alias (one release): use svi_jax.encoders / svi_jax.conditioners / svi_jax.data.factory
from svi_jax.conditioners import (LatentConditioner, PixelConditioner, ProConditioner,  # noqa: F401
                                  TalkConditioner, make_conditioner, make_pro_conditioner)
from svi_jax.data.factory import _is_built, make_data  # noqa: F401
from svi_jax.encoders import (ByteTokenizer, Codec, FrozenEncoders, _in_dtype, in_dtype,  # noqa: F401
                              make_encoders, make_image_encoder, make_text_encoder, vae_decode_fn, vae_encode_fn)
