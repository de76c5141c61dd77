"""Error-Recycling Fine-Tuning: on-device error banks, error injection and curation (see docs/erft.md)."""
from svi_jax.erft.banks import (  # noqa: F401
    Bank,
    bank_nbytes,
    decode,
    draw,
    draw_pooled,
    encode,
    grid_of,
    grid_timesteps,
    init_bank,
    init_banks,
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

