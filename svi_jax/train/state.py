"""The typed train state, how a fresh one is made, and the frozen DiT it trains around.

:class:`TrainState` is a pytree (``flax.struct.dataclass``)::

    frozen          frozen params {'dit', encoders ...} (a full fine-tune's DiT is trainable, not frozen)
    trainable       {'lora': LoRA collection (+ SVI-Dance's pose module)} or {'dit': DiT params} (train.trainable)
    opt             the optimizer state of ``trainable``
    rng, step       the step's PRNG key and counter
    nonfinite_run, nonfinite_total   non-finite steps in a row / in all
    banks           ERFT banks {'noise', 'latent'} (None with erft.enabled=False)

A checkpoint is everything but the frozen part (:meth:`TrainState.checkpoint`); its tree is the one the trainer
has always written (``{lora | dit, opt, banks, rng, step, nonfinite_run, nonfinite_total}``), so old run
directories resume unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from svi_jax import dance_train
from svi_jax import lora as lora_lib
from svi_jax.erft import sharded as erft_sharded
from svi_jax.errors import ConfigError
from svi_jax.models.dit import DiTConfig, init_params
from svi_jax.models.layers import dtype_of
from svi_jax.train.config import bank_dtype, is_full, latent_shape, make_optimizer

# the saved part, in the order the checkpoints have always listed it
_SAVED = ("rng", "step", "nonfinite_run", "nonfinite_total", "opt", "banks")


@flax.struct.dataclass
class TrainState:
    frozen: dict
    trainable: dict
    opt: Any
    rng: jax.Array
    step: jax.Array
    nonfinite_run: jax.Array
    nonfinite_total: jax.Array
    banks: Optional[dict] = None

    @property
    def full(self) -> bool:
        """A full fine-tune (the DiT trains), not a LoRA."""
        return "dit" in self.trainable

    @property
    def params(self) -> dict:
        """Every model param: the frozen ones and, in a full fine-tune, the trained DiT."""
        return dict(self.frozen, dit=self.trainable["dit"]) if self.full else self.frozen

    @property
    def lora(self):
        return self.trainable.get("lora")

    def variables(self, trainable: Optional[dict] = None) -> dict:
        """The DiT's flax variables with ``trainable`` (default: the state's) in place."""
        trainable = self.trainable if trainable is None else trainable
        if "dit" in trainable:
            return {"params": trainable["dit"]}
        return {"params": self.frozen["dit"], "lora": trainable["lora"]}

    def checkpoint(self) -> dict:
        """What a checkpoint stores: everything that changes, i.e. all but the frozen params (a full fine-tune
        saves the DiT it trains)."""
        out = {k: getattr(self, k) for k in _SAVED[:4]}
        if not self.full:
            out["lora"] = self.trainable["lora"]
        out["opt"] = self.opt
        if self.banks is not None:
            out["banks"] = self.banks
        if self.full:
            out["dit"] = self.trainable["dit"]
        return out

    def with_checkpoint(self, saved: dict) -> "TrainState":
        """This state with a restored :meth:`checkpoint` put back."""
        saved = dict(saved)
        trainable = {k: saved.pop(k) for k in self.trainable}
        return self.replace(trainable=trainable, **saved)

    # read access by name, as when the state was a dict (state["lora"], state["params"]["dit"], ...)
    def __getitem__(self, name: str):
        if name == "params":
            return self.params
        if name in ("lora", "dit") and name in self.trainable:
            return self.trainable[name]
        if name in _SAVED and getattr(self, name) is not None:
            return getattr(self, name)
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True


def init_state(config, params, key) -> TrainState:
    """Fresh train state around frozen ``params`` ({'dit': ..., encoders ...})."""
    k_lora, k_rng = jax.random.split(key)
    if is_full(config):
        frozen = {k: v for k, v in params.items() if k != "dit"}
        trainable = {"dit": params["dit"]}
    else:
        frozen = params
        lora = lora_lib.init_lora(params["dit"], k_lora, config.lora.rank, config.lora.targets,
                                  dtype_of(config.lora.dtype))
        if dance_train.enabled(config):       # SVI-Dance: the pose module is trained with the LoRA
            lora = dance_train.init_trainable(config, params["dit"], lora)
        trainable = {"lora": lora}
    banks = None
    if config.erft.enabled:
        banks = erft_sharded.init_banks(config, latent_shape(config), dtype=bank_dtype(config))
    def zero():  # one buffer each (a donated state must not hold one buffer twice)
        return jnp.zeros((), jnp.int32)

    return TrainState(frozen=frozen, trainable=trainable, opt=make_optimizer(config).init(trainable), rng=k_rng,
                      step=zero(), nonfinite_run=zero(), nonfinite_total=zero(), banks=banks)


def load_frozen_params(config, key) -> dict:
    """The frozen DiT (converted checkpoint at ``config.checkpoints.dit``, or a seeded random init)."""
    if config.get("pro", None) is not None:   # SVI 2.0 Pro: the trained expert of the Wan2.2 pair
        from svi_jax.pro import load_experts

        return load_experts(config, key, (config.pro.expert,))[config.pro.expert]
    cfg = DiTConfig.from_dict(config.model.to_dict())
    path = config.checkpoints.get("dit", "")
    if path:
        from svi_jax.models.dit import DiT

        dit = DiT.from_dir(path)
        bad = cfg.architecture_mismatch(dit.config)
        if bad:
            raise ConfigError(f"config.model.{bad[0]} = {bad[1]!r} but the DiT checkpoint {path} has {bad[2]!r}")
        p = dit.params
    else:
        p = init_params(cfg, jax.random.fold_in(key, 1))
    p = dance_train.with_pose_params(cfg, p, jax.random.fold_in(key, 3))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype_of(cfg.param_dtype)), p)
