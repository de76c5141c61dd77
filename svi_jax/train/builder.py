"""One builder for the trainer and the plan: :func:`build` makes the optimizer, the train state (or its abstract
shapes, ``abstract=True``), the state's shardings on the mesh and the jitted step, so ``svi_jax.plan`` compiles
exactly what ``python -m svi_jax.train`` runs.

The shardings of the state are derived once from its abstract shapes: the DiT's params by the logical rules table
(``svi_jax.sharding``), the LoRA after its kernels, the encoders by their own logical names, the optimizer state
after the parameters it tracks, the ERFT banks per replica (``svi_jax.erft.sharded``), the rest replicated. The
state is created already split over the mesh (never whole on one device).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from svi_jax import sharding
from svi_jax.config_schema import logical_rules
from svi_jax.erft import sharded as erft_sharded
from svi_jax.models.dit import DiTConfig, logical_specs, param_shapes
from svi_jax.train.config import make_optimizer
from svi_jax.train.state import TrainState, init_state, load_frozen_params
from svi_jax.train.step import identity_prepare, make_encode, make_train_step

log = logging.getLogger("svi_jax.train")


# ------------------------------------------------------------------------------------------------ shardings


def rules_of(config) -> tuple:
    """The logical rules table of ``config`` (``config.sharding.rules``; ``sharding.LOGICAL_RULES`` without one)."""
    return logical_rules(config) or sharding.LOGICAL_RULES


def encoder_specs(name: str, cfg, abstract, mesh, rules=sharding.LOGICAL_RULES):
    """Specs of the frozen encoders from their own logical names (UMT5 't5', CLIP 'clip', Wan VAE 'vae')."""
    if cfg is None or not jax.tree.leaves(abstract):  # unknown config (or nothing to place): replicate
        return sharding.replicated_specs(abstract)
    try:
        if name == "t5":
            from svi_jax.models.t5 import logical_axes
            logical = logical_axes(cfg)
        elif name == "clip":
            from svi_jax.models.clip import logical_axes
            logical = logical_axes(cfg)
        elif name == "vae":
            from svi_jax.models.vae import param_logical_axes
            logical = param_logical_axes(cfg)
        else:
            raise KeyError(name)
        return sharding.logical_tree_to_specs(logical, abstract, mesh, rules)
    except Exception as e:  # noqa: BLE001 - unknown encoder: replicate it (they are small next to the DiT)
        log.info("replicating the %s params (%s)", name, e)
        return sharding.replicated_specs(abstract)


def encoder_configs(conditioner) -> dict:
    """The encoder configs of a conditioner, for :func:`encoder_specs` (empty for cached latents)."""
    out = {}
    for name, attr in (("t5", "t5_cfg"), ("clip", "clip_cfg")):
        if getattr(conditioner, attr, None) is not None:
            out[name] = getattr(conditioner, attr)
    codec = getattr(conditioner, "codec", None)
    if codec is not None and getattr(codec, "kind", "") == "wan":
        out["vae"] = codec.cfg
    return out


def state_specs(config, state: TrainState, mesh, tx, encoder_cfgs: Optional[Mapping[str, Any]] = None) -> TrainState:
    """``PartitionSpec`` of every leaf of the train state (``state`` may be abstract), as a ``TrainState``."""
    import optax

    params, rules = state.params, rules_of(config)
    dit = sharding.dit_specs(logical_specs(DiTConfig.from_dict(config.model.to_dict())), params["dit"], mesh, rules)
    pspecs = {name: dit if name == "dit" else encoder_specs(name, (encoder_cfgs or {}).get(name), p, mesh, rules)
              for name, p in params.items()}
    trainable = {"dit": dit} if state.full else {"lora": sharding.lora_specs(state.trainable["lora"], dit)}
    opt = optax.tree_map_params(tx, lambda _, s: s, state.opt, trainable, transform_non_params=lambda _: P(),
                                is_leaf=lambda x: isinstance(x, P))
    banks = None if state.banks is None else erft_sharded.bank_specs(state.banks, mesh, int(config.erft.num_grids))
    return TrainState(frozen={k: pspecs[k] for k in state.frozen}, trainable=trainable, opt=opt, rng=P(), step=P(),
                      nonfinite_run=P(), nonfinite_total=P(), banks=banks)


def state_shardings(config, state: TrainState, mesh, tx, encoder_cfgs=None) -> TrainState:
    return sharding.to_shardings(state_specs(config, state, mesh, tx, encoder_cfgs), mesh)


def init_sharded(config, params, key, mesh: Mesh, tx, encoder_cfgs=None):
    """:func:`init_state` run under ``jit`` with the state's shardings as outputs, so LoRA, optimizer state and banks
    are created already split over the mesh; the given (frozen) ``params`` are placed, not copied. Returns
    ``(state, state_shardings)``."""
    def init(p, k):
        return init_state(config, p, k)

    sh = state_shardings(config, jax.eval_shape(init, params, key), mesh, tx, encoder_cfgs)
    params = jax.device_put(params, sh.params)

    def rest(p, k):  # everything but the given params
        s = init(p, k)
        return s.replace(frozen=None, trainable=None if s.full else s.trainable)

    out_sh = sh.replace(frozen=None, trainable=None if sh.full else sh.trainable)
    with jax.set_mesh(mesh):
        state = jax.jit(rest, out_shardings=out_sh)(params, key)
    if sh.full:
        return state.replace(frozen={k: v for k, v in params.items() if k != "dit"},
                             trainable={"dit": params["dit"]}), sh
    return state.replace(frozen=params), sh


# ------------------------------------------------------------------------------------------------ the jitted step


def encoder_params(tree) -> dict:
    """The frozen encoders' part of a state's params (or of its shardings): everything but the DiT."""
    return {k: v for k, v in tree.params.items() if k != "dit"}


class TrainStep:
    """``step(state, batch)`` jitted (:class:`svi_jax.sharding.MeshJit`) with explicit shardings on the first call
    (the batch structure is known then): the state as ``state_shardings`` and donated, the batch split over
    ``data`` x ``fsdp``, metrics replicated. Batches not yet on the mesh are put there (``device_put``, a no-op for
    arrays already sharded so).

    With frozen encoders (``encode_fn``, pixel batches) a step is two programs: the encoders' (encoder params,
    batch, ``state.rng``) -> model inputs, split like the batch, then the DiT step on those inputs. The encoders'
    temporaries are then never live beside the DiT step's (at 14B on v5p-64 the single program needs 114 GB/chip,
    the two 87 GB, see docs/scaling.md), and the random draws are the single program's (:func:`make_encode`)."""

    def __init__(self, step_fn: Callable, mesh: Mesh, state_shardings, rules=sharding.LOGICAL_RULES,
                 encode_fn: Optional[Callable] = None):
        self.step_fn, self.mesh, self.state_shardings, self.rules = step_fn, mesh, state_shardings, rules
        self.encode_fn = encode_fn
        self.batch_shardings = self.input_shardings = self.abstract_inputs = None
        self.jitted: Optional[sharding.MeshJit] = None
        self.encoder: Optional[sharding.MeshJit] = None

    def build(self, state, batch) -> sharding.MeshJit:
        if self.jitted is None:
            mesh, st_sh = self.mesh, self.state_shardings
            self.batch_shardings = sharding.to_shardings(sharding.batch_specs(batch, mesh), mesh)
            inputs = batch
            if self.encode_fn is not None:
                inputs = sharding.eval_shape_on(mesh, self.encode_fn, encoder_params(state), batch, state.rng,
                                                rules=self.rules)
            self.input_shardings = sharding.to_shardings(sharding.batch_specs(inputs, mesh), mesh)
            if self.encode_fn is not None:
                self.encoder = sharding.MeshJit(self.encode_fn, mesh, (encoder_params(st_sh), self.batch_shardings,
                                                                       st_sh.rng), self.input_shardings,
                                                rules=self.rules)
            self.abstract_inputs = sharding.abstract(inputs, self.input_shardings)
            metrics = sharding.eval_shape_on(mesh, self.step_fn, state, inputs, rules=self.rules)[1]
            m_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), metrics)
            self.jitted = sharding.MeshJit(self.step_fn, mesh, (st_sh, self.input_shardings), (st_sh, m_sh),
                                           donate_argnums=(0,), rules=self.rules)
        return self.jitted

    def encode(self, state, batch):
        """The model inputs of ``batch`` (the encoders' program; the batch itself when there are no encoders)."""
        self.build(state, batch)
        batch = jax.device_put(batch, self.batch_shardings)
        return batch if self.encoder is None else self.encoder(encoder_params(state), batch, state.rng)

    def __call__(self, state, batch):
        f = self.build(state, batch)
        return f(state, self.encode(state, batch))

    def lower(self, state, batch):
        """The DiT step's program (on the model inputs of ``batch``)."""
        return self.build(state, batch).lower(state, self.abstract_inputs)

    def lower_encode(self, state, batch):
        """The encoders' program, or None without encoders (cached latents)."""
        self.build(state, batch)
        return None if self.encoder is None else self.encoder.lower(encoder_params(state), batch, state.rng)


def sharded_train_step(config, conditioner, mesh, state_shardings):
    """The train step as the trainer runs it, jitted on ``mesh`` with ``state_shardings`` (:class:`TrainStep`):
    with frozen encoders (``conditioner.params``) their program first, then the DiT step. Returns
    ``(step, module, tx)``."""
    encode_fn = make_encode(conditioner.prepare) if conditioner.params else None
    step_fn, module, tx = make_train_step(config, identity_prepare if encode_fn else conditioner.prepare)
    return TrainStep(step_fn, mesh, state_shardings, rules_of(config), encode_fn), module, tx


# ------------------------------------------------------------------------------------------------ build


@dataclasses.dataclass
class Built:
    """What :func:`build` returns: the state (abstract: ``ShapeDtypeStruct``s carrying their shardings), its
    shardings, the jitted step, the DiT module, the optimizer and the conditioner the step prepares batches with."""

    state: TrainState
    shardings: TrainState
    step: TrainStep
    module: Any
    tx: Any
    conditioner: Any


def build(config, mesh: Mesh, abstract: bool = False, *, conditioner=None, params=None, init_key=None) -> Built:
    """Optimizer, train state, state shardings and the jitted step for ``config`` on ``mesh``.

    ``conditioner``: how batches become model inputs (default: cached latents, ``LatentConditioner``); its frozen
    encoder params join the DiT's. ``params``: the frozen params (default: :func:`load_frozen_params` with the
    seed of ``config.train.seed``, plus the conditioner's); ``init_key``: the key of the fresh state (default:
    derived from the same seed). ``abstract=True`` allocates nothing: the DiT's shapes (``param_shapes``), the
    state by ``jax.eval_shape`` -- what ``svi_jax.plan`` lowers and compiles.
    """
    if conditioner is None:
        from svi_jax.conditioners import LatentConditioner

        conditioner = LatentConditioner(config)
    key = jax.random.key(config.train.seed)
    init_key = jax.random.fold_in(key, 2) if init_key is None else init_key
    tx = make_optimizer(config)
    enc = encoder_configs(conditioner)
    if abstract:
        if params is None:
            params = {"dit": param_shapes(DiTConfig.from_dict(config.model.to_dict())), **conditioner.params}
        params = sharding.abstract(params)
        state = jax.eval_shape(lambda p, k: init_state(config, p, k), params, init_key)
        shardings = state_shardings(config, state, mesh, tx, enc)
        state = sharding.abstract(state, shardings)
    else:
        if params is None:
            params = {"dit": load_frozen_params(config, key), **conditioner.params}
        state, shardings = init_sharded(config, params, init_key, mesh, tx, enc)
    step, module, tx = sharded_train_step(config, conditioner, mesh, shardings)
    return Built(state=state, shardings=shardings, step=step, module=module, tx=tx, conditioner=conditioner)
