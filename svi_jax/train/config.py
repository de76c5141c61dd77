"""What the trainer checks and derives from a config before building anything: the checks, the latent shape of a
training clip, the learning rate (schedule), the optimizer and what is trained (LoRA or the whole DiT)."""
from __future__ import annotations

import optax

from svi_jax.errors import ConfigError
from svi_jax.models.dit import DiTConfig

TRAINABLE = ("lora", "full")
BANK_DTYPES = ("bfloat16", "float32", "int8")


def validate_config(config) -> None:
    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(config.train.num_steps >= 0, "train.num_steps", f"must be >= 0, got {config.train.num_steps}")
    need(config.train.ckpt_every >= 1, "train.ckpt_every", f"must be >= 1, got {config.train.ckpt_every}")
    need(config.train.keep >= 1, "train.keep", f"must be >= 1, got {config.train.keep}")
    need(config.lora.rank >= 1, "lora.rank", f"must be >= 1, got {config.lora.rank}")
    need(config.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {config.data.batch_size}")
    need(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    need(config.optim.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {config.optim.grad_clip}")
    for p in ("p_noise", "p_latent", "p_image", "p_clean", "p_insert_clean"):
        v = config.erft[p]
        need(0.0 <= v <= 1.0, f"erft.{p}", f"is a probability, got {v}")
    need(config.erft.capacity >= 1, "erft.capacity", f"must be >= 1, got {config.erft.capacity}")
    need(config.erft.num_grids >= 1, "erft.num_grids", f"must be >= 1, got {config.erft.num_grids}")
    need(config.erft.bank_dtype in BANK_DTYPES, "erft.bank_dtype",
         f"must be bfloat16, float32 or int8, got {config.erft.bank_dtype!r}")
    try:
        DiTConfig.from_dict(config.model.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def latent_shape(config) -> tuple[int, int, int, int]:
    """Per-example latent shape ``(F, H/s, W/s, z_dim)`` of the training clips (s = 8 for the Wan VAE)."""
    d = config.data
    vae = config.encoders.vae
    s = int(vae.get("spatial", 4)) if vae.get("kind", "wan") == "patch" else 8
    if (d.num_frames - 1) % 4:
        raise ConfigError(f"config.data.num_frames must be 1 + 4k (the VAE packs 4 frames), got {d.num_frames}")
    if d.height % (2 * s) or d.width % (2 * s):
        raise ConfigError(f"config.data.height/width must be multiples of {2 * s}, got {d.height}x{d.width}")
    return (1 + (d.num_frames - 1) // 4, d.height // s, d.width // s, config.model.out_dim)


def learning_rate(config):
    """``optim.lr``, or with ``optim.schedule='cosine'`` a decay from it to 0 over ``train.num_steps``."""
    o = config.optim
    schedule = o.get("schedule", "constant")
    if schedule == "cosine":  # e.g. to finish pre-training a base
        return optax.cosine_decay_schedule(o.lr, max(1, int(config.train.num_steps)))
    if schedule != "constant":
        raise ConfigError(f"config.optim.schedule must be 'constant' or 'cosine', got {schedule!r}")
    return o.lr


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def is_full(config) -> bool:
    """``train.trainable``: 'lora' (SVI: the LoRA only) or 'full' (every DiT parameter, e.g. to pre-train a base)."""
    mode = config.train.get("trainable", "lora")
    if mode not in TRAINABLE:
        raise ConfigError(f"config.train.trainable must be 'lora' or 'full', got {mode!r}")
    return mode == "full"


def bank_dtype(config):
    """The storage dtype of the ERFT banks (``erft.bank_dtype``)."""
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "int8": jnp.int8}[config.erft.bank_dtype]
