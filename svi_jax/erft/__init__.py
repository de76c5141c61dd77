"""Error-Recycling Fine-Tuning: on-device error banks, error injection and curation (see docs/erft.md)."""
from svi_jax.erft.banks import (  # noqa: F401
    Bank,
    bank_nbytes,
    decode,
    encode,
    grid_of,
    grid_timesteps,
    init_bank,
    insert,
    insert_many,
    sample,
    sample_pooled,
)
from svi_jax.erft.inject import (  # noqa: F401
    DEFAULTS,
    curate,
    erft_config,
    errors_from_prediction,
    inject,
)


def init_banks(shape, num_grids: int = 50, capacity: int = 500, dtype=None) -> dict:
    """``{'noise': Bank, 'latent': Bank}``, both empty (bf16 unless ``dtype`` says otherwise)."""
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if dtype is None else dtype
    return {name: init_bank(num_grids, capacity, shape, dtype) for name in ("noise", "latent")}
