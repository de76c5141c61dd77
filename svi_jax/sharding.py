"""One device mesh, one logical-axis rules table, sharded train state and a pjit-style train step.

Mesh axes (``config.mesh``; sizes, ``-1`` = the rest of the devices, at most one ``-1``):

* ``data``: data parallelism. Each data replica owns its ERFT banks (``erft.bank_mode='replica'``).
* ``fsdp``: the batch is split over it as well, and every weight/optimizer tensor is sharded over it (ZeRO-3 /
  FSDP: XLA all-gathers a layer's weights right before use and reduce-scatters the gradients).
* ``context``: the token sequence of one clip (32,760 tokens at 81x480x832) split across devices; attention
  runs as ``ulysses`` or ``ring`` (``svi_jax.models.attention_parallel``), everything else is token-local.
* ``tensor``: Megatron-style heads / FFN-hidden split.

``LOGICAL_RULES`` maps the logical names carried by every parameter and activation constraint of the DiT, the
UMT5 / CLIP encoders and the VAE to these axes. ``state_shardings`` gives the ``NamedSharding`` of every leaf of
the train state; ``jit_train_step`` jits the step with explicit in/out shardings and the state donated.

ERFT banks on a mesh (``config.erft.bank_mode``):

* ``'replica'`` (default, the official semantics): ``R`` = ``erft.bank_replicas`` (0: the ``data`` axis size)
  banks, stacked replica-major along the grid axis (``errors [R*G, K, *latent]``) and split by replica over
  ``data``; each entry (a whole latent) is
  additionally split over the replica's other devices (``fsdp``/``context``/``tensor``) along the latent's own
  axes. Example ``b`` of the global batch belongs to replica ``b // (B / R)``; it samples from and inserts into
  its replica's banks (all replicas' errors during warm-up, via ``erft.curate(axis_name=...)``). On a mesh whose
  ``data`` size is ``R`` this runs under ``shard_map`` over ``data`` (each device touches only its replica's
  entries, updates in place); elsewhere (one device, tests) as a ``vmap`` with the same result.
  Memory: ``2 x G x K x |latent|`` bytes per replica, divided by the devices of a replica.
* ``'global'``: one pair of banks shared by all replicas, entries split over *all* devices; every error of the
  global batch is inserted each step (the warm-up behaviour, forever). The nearest-neighbour replacement is the
  same code: each device computes the squared distances over its slice of every entry of the grid, one
  all-reduce of ``K`` partial sums gives the global distances and the argmin. Memory: ``2 x G x K x |latent|``
  divided by *all* devices (``R`` times less per device than 'replica'), at the price of one shared error
  population (diversity across replicas is shared, not kept separate) and ``B`` inserts per step into one bank.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
BANK_MODES = ("replica", "global")

# Logical axis -> mesh axes, in priority order (flax semantics: a rule is skipped when its mesh axes are already
# used by another dimension of the same array, the dimension then stays unsharded).
LOGICAL_RULES = (
    # activations (DiT)
    ("activation_batch", BATCH_AXES),
    ("activation_length", "context"),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_embed", None),
    # activations (UMT5, CLIP: ('batch', 'length', 'embed' | 'mlp'); VAE: ('batch', 'frames', 'height', 'width',
    # 'channels')). 'batch' comes before 'embed' so an activation's 'embed' never takes 'fsdp' from its batch.
    ("batch", BATCH_AXES),
    ("length", "context"),
    ("frames", None),
    ("height", "context"),
    ("width", None),
    ("channels", None),
    # parameters
    ("layers", None),          # the nn.scan axis
    ("embed", ("fsdp", "context")),  # model width: FSDP (ZeRO-3 over the context devices too)
    ("heads", "tensor"),       # heads * head_dim
    ("mlp", "tensor"),         # FFN hidden
    ("kv", "fsdp"),            # cross-attention input widths (text_dim, CLIP dim)
    ("vocab", "tensor"),
    ("conv_in", None),         # VAE convolutions: small (0.5 GB), replicated
    ("conv_out", None),
    ("norm", None),
)


# ------------------------------------------------------------------------------------------------ mesh


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict:
    """Resolve ``{data, fsdp, context, tensor}`` sizes (``-1`` = the rest) for ``num_devices``."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the rest), got {rest}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes ({fixed})")
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``MESH_AXES`` from ``config.mesh`` (every axis present, size 1 if unused).

    Devices are laid out by ``jax.make_mesh`` (topology-aware on TPU: ``tensor``/``context`` get the fastest
    links, ``data`` the slowest).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(dict(mesh_cfg or {"data": -1}), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # noqa: BLE001 - fake/odd topologies: plain row-major order
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def axis_sizes(mesh) -> dict:
    return {a: int(s) for a, s in dict(mesh.shape).items()}


# ------------------------------------------------------------------------------------------------ specs


def fit_spec(spec: P, shape, mesh) -> P:
    """``spec`` with, per dimension, only the leading mesh axes whose size product divides that dimension."""
    sizes = axis_sizes(mesh)
    out = []
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    for dim, entry in zip(shape, entries):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        kept, prod = [], 1
        for n in names:
            s = sizes.get(n, 1)
            if s == 1 or dim % (prod * s):
                continue
            kept.append(n)
            prod *= s
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def logical_to_spec(names, shape=None, mesh=None, rules=LOGICAL_RULES) -> P:
    """Logical axis names -> mesh ``PartitionSpec`` (fitted to ``shape`` when given)."""
    import flax.linen as nn

    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    if shape is not None and mesh is not None:
        spec = fit_spec(spec, shape, mesh)
    return spec


def logical_tree_to_specs(logical, abstract, mesh, rules=LOGICAL_RULES):
    """A tree of logical ``PartitionSpec``s + the matching abstract arrays -> mesh ``PartitionSpec``s."""
    return jax.tree.map(lambda names, a: logical_to_spec(tuple(names), a.shape, mesh, rules), logical, abstract)


def dit_specs(model_cfg, abstract_params, mesh):
    from svi_jax.models.dit import DiTConfig, logical_specs

    cfg = model_cfg if isinstance(model_cfg, DiTConfig) else DiTConfig.from_dict(model_cfg)
    return logical_tree_to_specs(logical_specs(cfg), abstract_params, mesh)


def lora_specs(lora_abstract, dit_param_specs):
    """LoRA ``a [L, in, r]`` / ``b [L, r, out]`` follow their kernel's ``[L, in, out]`` sharding (rank unsharded)."""
    from svi_jax.checkpoint import flatten, unflatten

    kernels = flatten(dit_param_specs)
    out = {}
    for path, a in flatten(lora_abstract).items():
        mod, leaf = path.rsplit("/", 1)
        if leaf not in ("a", "b"):      # other trained leaves in the collection (SVI-Dance's pose module): small
            out[path] = P()
            continue
        ks = tuple(kernels[mod + "/kernel"])
        ks = ks + (None,) * (a.ndim - len(ks))
        if leaf == "a":
            out[path] = P(*ks[:-1], None)
        else:
            out[path] = P(*ks[:-2], None, ks[-1])
    return unflatten(out)


def _entry_spec(entry_shape, axes, sizes) -> list:
    """Spread mesh ``axes`` over the dims of a latent entry ``[F, H, W, C]`` (channels first, then width, height,
    frames), each axis on the first dim it still divides."""
    parts = [[] for _ in entry_shape]
    left = list(entry_shape)
    order = list(range(len(entry_shape)))[::-1]
    for a in axes:
        s = sizes.get(a, 1)
        if s == 1:
            continue
        for d in order:
            if left[d] % s == 0:
                parts[d].append(a)
                left[d] //= s
                break
    return [None if not p else (p[0] if len(p) == 1 else tuple(p)) for p in parts]


def bank_specs(banks, mesh, num_grids: Optional[int] = None, latent_ndim: int = 4):
    """Specs of ``{'noise': Bank, 'latent': Bank}``: per-replica banks (``R x num_grids`` rows, replica-major) are
    split by replica over ``data`` and each entry over the replica's other devices; one global bank (``num_grids``
    rows, or ``num_grids`` not given) has its entries split over all devices."""
    from svi_jax.erft import Bank

    sizes = axis_sizes(mesh)

    def one(bank):
        rows = bank.errors.shape[0]
        R = rows // num_grids if num_grids else 1
        entry = bank.errors.shape[-latent_ndim:]
        if R > 1:
            lead = "data" if sizes.get("data", 1) > 1 and R % sizes["data"] == 0 else None
            axes = [a for a in MESH_AXES if a != "data"]
        else:
            lead = None
            axes = list(MESH_AXES)
        e = _entry_spec(entry, axes, sizes)
        return Bank(P(lead, None, *e), P(lead), None if bank.scale is None else P(lead, None))

    return {k: one(b) for k, b in banks.items()}


def batch_specs(batch, mesh):
    """Every batch array split along its leading (batch) axis over ``data`` x ``fsdp`` (where it divides)."""
    return jax.tree.map(lambda a: fit_spec(P(BATCH_AXES), a.shape, mesh) if a.ndim else P(), batch)


def encoder_specs(name: str, cfg, abstract, mesh):
    """Specs of the frozen encoders from their own logical names (UMT5 't5', CLIP 'clip', Wan VAE 'vae')."""
    if cfg is None or not jax.tree.leaves(abstract):  # unknown config (or nothing to place): replicate
        return jax.tree.map(lambda a: P(), abstract)
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
        return logical_tree_to_specs(logical, abstract, mesh)
    except Exception as e:  # noqa: BLE001 - unknown encoder: replicate it (they are small next to the DiT)
        log.info("replicating the %s params (%s)", name, e)
        return jax.tree.map(lambda a: P(), abstract)


def state_specs(config, state, mesh, tx=None, encoder_cfgs: Optional[Mapping[str, Any]] = None):
    """``PartitionSpec`` of every leaf of the train state (``state`` may be abstract)."""
    import optax

    if tx is None:      # the optimizer is passed in (svi_jax.train.make_optimizer): sharding imports no trainer
        raise TypeError("state_specs needs the optimizer (tx) whose state it lays out")
    specs = {}
    p = state["params"]
    pspecs = {"dit": dit_specs(config.model.to_dict(), p["dit"], mesh)}
    for name in p:
        if name != "dit":
            pspecs[name] = encoder_specs(name, (encoder_cfgs or {}).get(name), p[name], mesh)
    specs["params"] = pspecs
    if "lora" in state:
        specs["lora"] = lora_specs(state["lora"], pspecs["dit"])
        trainable_specs = {"lora": specs["lora"]}
    else:
        trainable_specs = {"dit": pspecs["dit"]}
    specs["opt"] = optax.tree_map_params(tx, lambda _, s: s, state["opt"], trainable_specs,
                                         transform_non_params=lambda _: P(),
                                         is_leaf=lambda x: isinstance(x, P))
    if "banks" in state:
        specs["banks"] = bank_specs(state["banks"], mesh, int(config.erft.num_grids))
    for k, v in state.items():
        if k not in specs:
            specs[k] = jax.tree.map(lambda _: P(), v)
    return specs


def to_shardings(specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(config, state, mesh, tx=None, encoder_cfgs=None):
    return to_shardings(state_specs(config, state, mesh, tx, encoder_cfgs), mesh)


def shard_state(state, mesh, config=None, shardings=None, tx=None, encoder_cfgs=None):
    """Place (or re-place) a train state on ``mesh``; donates nothing, returns the sharded copy."""
    if shardings is None:
        shardings = state_shardings(config, state, mesh, tx, encoder_cfgs)
    return jax.device_put(state, shardings)


def abstract(tree, shardings=None):
    """ShapeDtypeStructs of ``tree`` (with ``shardings`` attached when given), e.g. for an orbax restore."""
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays) under ``shardings`` (from the shard shapes)."""
    total = 0
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for a, s in zip(jax.tree.leaves(tree), leaves):
        n = int(np.prod(s.shard_shape(a.shape)))
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            total += 8 * n
        else:
            total += n * np.dtype(a.dtype).itemsize
    return total


# ------------------------------------------------------------------------------------------------ jit


class MeshJit:
    """A jitted function that traces and runs under ``jax.set_mesh(mesh)`` and the logical rules table (so the
    models' ``nn.with_logical_constraint`` and ``shard_map`` attention see the mesh). ``lower`` for AOT."""

    def __init__(self, fn: Callable, mesh: Mesh, in_shardings, out_shardings, donate_argnums=(),
                 rules=LOGICAL_RULES):
        import flax.linen as nn

        self.mesh, self.rules = mesh, rules
        self.in_shardings, self.out_shardings = in_shardings, out_shardings

        def traced(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)

        self.jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=donate_argnums)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def metrics_shardings(step_fn, state, batch, mesh):
    out = jax.eval_shape(step_fn, state, batch)[1]
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), out)


def jit_train_step(step_fn: Callable, mesh: Mesh, config, state, batch, tx=None, encoder_cfgs=None,
                   donate: bool = True) -> MeshJit:
    """``step_fn(state, batch) -> (state, metrics)`` jitted with explicit shardings: state as
    :func:`state_shardings`, batch split over ``data`` x ``fsdp``, metrics replicated; the state is donated.
    ``state`` / ``batch`` may be abstract (``jax.ShapeDtypeStruct``s)."""
    import flax.linen as nn

    s_sh = state_shardings(config, state, mesh, tx, encoder_cfgs)
    b_sh = to_shardings(batch_specs(batch, mesh), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        m_sh = metrics_shardings(step_fn, state, batch, mesh)
    return MeshJit(step_fn, mesh, (s_sh, b_sh), (s_sh, m_sh), donate_argnums=(0,) if donate else ())


class TrainStep:
    """``step(state, batch)`` jitted with explicit shardings on the first call (the batch structure is known then);
    batches not yet on the mesh are put there (``device_put``, a no-op for arrays already sharded so)."""

    def __init__(self, step_fn: Callable, mesh: Mesh, config, state_sh, tx=None, encoder_cfgs=None):
        self.step_fn, self.mesh, self.config, self.tx, self.encoder_cfgs = step_fn, mesh, config, tx, encoder_cfgs
        self.state_shardings = state_sh
        self.batch_shardings = None
        self.jitted: Optional[MeshJit] = None

    def build(self, state, batch) -> MeshJit:
        import flax.linen as nn

        if self.jitted is None:
            self.batch_shardings = to_shardings(batch_specs(batch, self.mesh), self.mesh)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
                m_sh = metrics_shardings(self.step_fn, state, batch, self.mesh)
            self.jitted = MeshJit(self.step_fn, self.mesh, (self.state_shardings, self.batch_shardings),
                                  (self.state_shardings, m_sh), donate_argnums=(0,))
        return self.jitted

    def __call__(self, state, batch):
        f = self.build(state, batch)
        return f(state, jax.device_put(batch, self.batch_shardings))

    def lower(self, state, batch):
        return self.build(state, batch).lower(state, batch)


def jit_sampler(sample_fn: Callable, mesh: Mesh, model_cfg, params, *example, lora=None) -> MeshJit:
    """``sample_fn(params, noise, context, neg_context, clip_fea, y[, lora]) -> latents`` (``svi_jax.sampler.
    make_sampler(..., jit=False)``) jitted with explicit shardings: DiT params by the rules table, every per-clip
    input and the output split along the batch over ``data`` x ``fsdp`` (``None`` inputs stay ``None``)."""
    pspecs = dit_specs(model_cfg, params, mesh)
    args_specs = [None if a is None else fit_spec(P(BATCH_AXES), a.shape, mesh) for a in example]
    in_specs = [pspecs, *args_specs]
    args = list(example)
    if lora is not None:
        in_specs.append(lora_specs(lora, pspecs))
    in_sh = tuple(None if sp is None else to_shardings(sp, mesh) for sp in in_specs)
    out_sh = NamedSharding(mesh, args_specs[0])

    def fn(params, *rest):
        if lora is None:
            return sample_fn(params, *rest)
        *a, lo = rest
        return sample_fn(params, *a, lo)

    del args
    return MeshJit(fn, mesh, in_sh, out_sh)


def init_sharded(init_fn: Callable, params, key, mesh: Mesh, config, tx=None, encoder_cfgs=None):
    """``init_fn(params, key) -> state`` run under ``jit`` with the state's shardings as outputs, so LoRA, optimizer
    state and banks are created already split over the mesh (never whole on one device). Returns
    ``(state, state_shardings)``."""
    abstract_state = jax.eval_shape(init_fn, params, key)
    sh = state_shardings(config, abstract_state, mesh, tx, encoder_cfgs)
    params = jax.device_put(params, sh["params"])

    def rest(p, k):  # everything but the (frozen, given) params
        return {name: v for name, v in init_fn(p, k).items() if name != "params"}

    with jax.set_mesh(mesh):
        state = jax.jit(rest, out_shardings={k: v for k, v in sh.items() if k != "params"})(params, key)
    return {"params": params, **state}, sh


def encoder_configs(conditioner) -> dict:
    """The encoder configs of a ``pipeline`` conditioner, for :func:`encoder_specs` (empty for cached latents)."""
    out = {}
    for name, attr in (("t5", "t5_cfg"), ("clip", "clip_cfg")):
        if getattr(conditioner, attr, None) is not None:
            out[name] = getattr(conditioner, attr)
    codec = getattr(conditioner, "codec", None)
    if codec is not None and getattr(codec, "kind", "") == "wan":
        out["vae"] = codec.cfg
    return out


# ------------------------------------------------------------------------------------------------ banks


def bank_mode(config) -> str:
    mode = config.erft.get("bank_mode", "replica")
    if mode not in BANK_MODES:
        raise ValueError(f"config.erft.bank_mode must be one of {BANK_MODES}, got {mode!r}")
    return mode


def num_bank_replicas(config, num_devices: Optional[int] = None) -> int:
    """``R``: 1 in 'global' mode; in 'replica' mode ``erft.bank_replicas`` or (0) the mesh's ``data`` size."""
    if bank_mode(config) == "global":
        return 1
    r = int(config.erft.get("bank_replicas", 0))
    if r > 0:
        return r
    n = jax.device_count() if num_devices is None else num_devices
    return mesh_shape(dict(config.mesh), n)["data"]


def init_banks(config, latent_shape, num_devices: Optional[int] = None, dtype=None):
    """Empty banks. ``R > 1`` replicas are stacked replica-major along the grid axis: ``errors [R*G, K, *latent]``,
    ``count [R*G]`` (each device then holds whole ``[G, K, ...]`` banks of its replicas, no extra axis to squeeze)."""
    from svi_jax import erft

    R = num_bank_replicas(config, num_devices)
    banks = erft.init_banks(latent_shape, config.erft.num_grids, config.erft.capacity, dtype)
    if R == 1:
        return banks
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (R,) + x.shape).reshape((R * x.shape[0],) + x.shape[1:]),
                        banks)


def _replicas(banks, cfg) -> int:
    """``R`` if the banks hold ``R > 1`` replicas (``R * num_grids`` rows), else 0."""
    G = int(_cfg(cfg, "num_grids"))
    rows = banks["noise"].errors.shape[0]
    if rows % G:
        raise ValueError(f"the banks have {rows} grid rows, not a multiple of num_grids={G}")
    return rows // G if rows > G else 0


def _unstack(banks, R):
    return jax.tree.map(lambda a: a.reshape((R, a.shape[0] // R) + a.shape[1:]), banks)


def _stack(banks):
    return jax.tree.map(lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]), banks)


def _replica_mesh(R: int):
    """The context mesh if its ``data`` axis holds exactly the ``R`` bank replicas (shard_map path), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or R < 2:
        return None
    return mesh if axis_sizes(mesh).get("data", 1) == R else None


def _split(x, R):
    return None if x is None else x.reshape((R, x.shape[0] // R) + x.shape[1:])


def _merge(x):
    return None if x is None else x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def inject(key, banks, x0, y, eps, t, sigma, cfg):
    """``erft.inject`` for either bank layout (see the module docstring); same signature and outputs."""
    from svi_jax import erft

    R = _replicas(banks, cfg)
    if not R:
        return erft.inject(key, banks, x0, y, eps, t, sigma, cfg)
    B = x0.shape[0]
    if B % R:
        raise ValueError(f"the batch ({B}) must be a multiple of the number of bank replicas ({R})")
    keys = jax.random.split(key, R)
    mesh = _replica_mesh(R)
    if mesh is not None:
        d = P("data")

        def body(keys, banks, x0, y, eps, t, sigma):  # this replica's [G, K, ...] banks
            return erft.inject(keys[0], banks, x0, y, eps, t, sigma, cfg)

        y_spec = None if y is None else d
        fn = jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, y_spec, d, d, d),
                           out_specs=(d, d, y_spec, d), axis_names={"data"}, check_vma=False)
        return fn(keys, banks, x0, y, eps, t, sigma)

    def one(k, b, x0, y, eps, t, sigma):
        return erft.inject(k, b, x0, y, eps, t, sigma, cfg)

    x_t, target, y_new, info = jax.vmap(one)(keys, _unstack(banks, R), _split(x0, R), _split(y, R), _split(eps, R),
                                             _split(t, R), _split(sigma, R))
    return _merge(x_t), _merge(target), _merge(y_new), jax.tree.map(_merge, info)


def curate(key, banks, t, sigma, v_pred, target, info, step, cfg):
    """``erft.curate`` for either bank layout: per replica (its own errors; all replicas' during warm-up), or
    every error of the batch into the one global bank."""
    from svi_jax import erft

    R = _replicas(banks, cfg)
    if not R:
        return erft.curate(key, banks, t, sigma, v_pred, target, info, step, cfg)
    keys = jax.random.split(key, R)
    mesh = _replica_mesh(R)
    info = {"clean": info["clean"]}
    if mesh is not None:
        d = P("data")

        def body(keys, banks, t, sigma, v_pred, target, info, step):  # this replica's [G, K, ...] banks
            return _curate_gathered(keys[0], banks, t, sigma, v_pred, target, info["clean"], step, cfg, "data", R)

        fn = jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, d, d, d, d, P()), out_specs=d,
                           axis_names={"data"}, check_vma=False)
        return fn(keys, banks, t, sigma, v_pred, target, info, step)

    def one(k, b, t, sigma, v_pred, target, info):
        return erft.curate(k, b, t, sigma, v_pred, target, info, step, cfg, axis_name="bank_replica")

    sp = lambda x: _split(x, R)  # noqa: E731
    return _stack(jax.vmap(one, axis_name="bank_replica")(keys, _unstack(banks, R), sp(t), sp(sigma), sp(v_pred),
                                                          sp(target), jax.tree.map(sp, info)))


def _cfg(cfg, name):
    from svi_jax.erft import DEFAULTS

    return cfg.get(name, DEFAULTS[name]) if hasattr(cfg, "get") else getattr(cfg, name, DEFAULTS[name])


def _curate_gathered(key, banks, t, sigma, v_pred, target, clean, step, cfg, axis: str, R: int):
    """``erft.curate(..., axis_name=axis)`` for one replica inside ``shard_map``, as a single insert loop.

    ``erft.curate`` switches between warm-up (insert everyone's errors) and local (own errors) with a
    ``lax.cond`` whose two branches both update the banks; XLA then copies both banks (2 x 105 GB at full size).
    Here the errors are always all-gathered and the warm-up switch only changes which of them are ``valid``
    (after warm-up: this replica's own, in the same order), so the banks are updated in place. Same results
    (checked against ``erft.curate`` under ``vmap`` in tests/test_sharding.py).
    """
    from svi_jax import erft

    B = v_pred.shape[0]
    e_n, e_x = erft.errors_from_prediction(v_pred, target, sigma)
    grid = erft.grid_of(t, int(_cfg(cfg, "num_grids")), float(_cfg(cfg, "shift")), int(_cfg(cfg, "grid_offset")),
                        int(_cfg(cfg, "grid_steps")))
    gate = ~(jnp.asarray(clean) > 0.5) | (jax.random.uniform(key, (B,)) < _cfg(cfg, "p_insert_clean"))
    mode = _cfg(cfg, "warmup_gate")
    if mode not in ("receiver", "source"):
        raise ValueError(f"warmup_gate must be 'receiver' or 'source', got {mode!r}")

    mesh = jax.sharding.get_abstract_mesh()
    entry = _entry_spec(v_pred.shape[1:], [a for a in MESH_AXES if a != axis], axis_sizes(mesh))

    def gather(x, dtype=None):
        x = x if dtype is None else x.astype(dtype)
        g = jax.lax.all_gather(x, axis)  # [R, B, ...], replica order
        g = g.reshape((-1,) + g.shape[2:])
        if g.ndim == 1 + len(entry):
            # split each error like the bank entries, so the nearest-entry distances stay local (otherwise GSPMD
            # may gather a whole grid's K entries, 4 GB in f32 at 81x480x832)
            g = jax.lax.with_sharding_constraint(g, P(None, *entry))
        return g

    wire = lambda b: b.errors.dtype if jnp.issubdtype(b.errors.dtype, jnp.floating) else jnp.float32  # noqa: E731
    grids = gather(grid)
    received = jnp.tile(gate, R)
    warm_valid = gather(gate) if mode == "source" else received
    own = (jnp.arange(R * B) // B) == jax.lax.axis_index(axis)
    warm = jnp.asarray(step) < _cfg(cfg, "warmup_steps")
    valid = jnp.where(warm, warm_valid, own & received)
    return {"noise": erft.insert_many(banks["noise"], grids, gather(e_n, wire(banks["noise"])), valid),
            "latent": erft.insert_many(banks["latent"], grids, gather(e_x, wire(banks["latent"])), valid)}
