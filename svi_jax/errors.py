"""Exceptions every layer may raise (no svi_jax imports): the CLI turns them into one line."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""
