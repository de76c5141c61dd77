"""One device mesh, one logical-axis rules table, partition specs and the one jit helper (:class:`MeshJit`).

Mesh axes (``config.mesh``; sizes, ``-1`` = the rest of the devices, at most one ``-1``):

* ``data``: data parallelism (each data replica owns its ERFT banks, ``svi_jax.erft.sharded``).
* ``fsdp``: the batch is split over it as well, and every weight/optimizer tensor is sharded over it (ZeRO-3 /
  FSDP: XLA all-gathers a layer's weights right before use and reduce-scatters the gradients).
* ``context``: the token sequence of one clip (32,760 tokens at 81x480x832) split across devices; attention
  runs as ``ulysses`` or ``ring`` (``svi_jax.models.attention_parallel``), everything else is token-local.
* ``tensor``: Megatron-style heads / FFN-hidden split.

``LOGICAL_RULES`` maps the logical names carried by every parameter and activation constraint of the DiT, the
UMT5 / CLIP encoders and the VAE to these axes. This module knows meshes and specs only (it imports nothing from
``svi_jax``): callers pass the models' logical specs in (``dit_specs``), the train state's shardings are put
together in ``svi_jax.train.build``, the ERFT bank layout lives in ``svi_jax.erft.sharded``. :class:`MeshJit` is
the one jit helper: the trainer, ``svi_jax.plan`` and the sampler all jit through it.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

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


def dit_specs(logical, abstract_params, mesh, rules=LOGICAL_RULES):
    """Specs of the DiT params from the model's logical specs (``svi_jax.models.dit.logical_specs(cfg)``)."""
    return logical_tree_to_specs(logical, abstract_params, mesh, rules)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _flatten(tree) -> dict:
    """``{'a/b/c': leaf}`` of a nested dict (specs are leaves; svi_jax.trees.flatten, which sharding may not import)."""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec)[0]}


def _unflatten(flat: Mapping) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def lora_specs(lora_abstract, dit_param_specs):
    """LoRA ``a [L, in, r]`` / ``b [L, r, out]`` follow their kernel's ``[L, in, out]`` sharding (rank unsharded)."""
    kernels = _flatten(dit_param_specs)
    out = {}
    for path, a in _flatten(lora_abstract).items():
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
    return _unflatten(out)


def entry_spec(entry_shape, axes, sizes) -> list:
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


def replicated_entries_spec(shape, mesh, replicas: int, latent_ndim: int = 4) -> tuple[P, P]:
    """``(spec, lead)`` of an array ``[rows, ..., *entry]`` whose rows are ``replicas`` replica-major blocks (an ERFT
    bank's ``errors [R*G, K, *latent]``): with ``replicas > 1`` the rows are split by replica over ``data`` (where
    ``data`` divides them) and each entry over the replica's other devices; otherwise every entry over all devices.
    ``lead`` is the spec of the rows alone (e.g. a per-row counter)."""
    sizes = axis_sizes(mesh)
    entry = tuple(shape[-latent_ndim:])
    if replicas > 1:
        lead = "data" if sizes.get("data", 1) > 1 and replicas % sizes["data"] == 0 else None
        axes = [a for a in MESH_AXES if a != "data"]
    else:
        lead, axes = None, list(MESH_AXES)
    middle = (None,) * (len(shape) - 1 - len(entry))
    return P(lead, *middle, *entry_spec(entry, axes, sizes)), P(lead)


def batch_specs(batch, mesh):
    """Every batch array split along its leading (batch) axis over ``data`` x ``fsdp`` (where it divides)."""
    return jax.tree.map(lambda a: fit_spec(P(BATCH_AXES), a.shape, mesh) if a.ndim else P(), batch)


def replicated_specs(tree):
    return jax.tree.map(lambda _: P(), tree)


def to_shardings(specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


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
    """The one jit helper: ``fn`` jitted with explicit in/out shardings (and donation), traced and run under
    ``jax.set_mesh(mesh)`` and the logical rules table (so the models' ``nn.with_logical_constraint`` and
    ``shard_map`` attention see the mesh). ``lower`` for AOT. The trainer's step (``svi_jax.train.build``), the
    plan (``svi_jax.plan``) and the sampler (``svi_jax.sample_mesh``) all jit through it."""

    def __init__(self, fn: Callable, mesh: Mesh, in_shardings, out_shardings, donate_argnums=(),
                 rules=LOGICAL_RULES):
        self.mesh, self.rules = mesh, rules
        self.in_shardings, self.out_shardings = in_shardings, out_shardings

        def traced(*args):
            with logical_rules(rules):
                return fn(*args)

        self.jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=donate_argnums)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def logical_rules(rules=LOGICAL_RULES):
    """The context in which flax's logical constraints resolve with ``rules``."""
    import flax.linen as nn

    return nn.logical_axis_rules(rules)


def eval_shape_on(mesh: Mesh, fn: Callable, *args, rules=LOGICAL_RULES):
    """``jax.eval_shape(fn, *args)`` traced as :class:`MeshJit` traces (under ``mesh`` and the rules table)."""
    with jax.set_mesh(mesh), logical_rules(rules):
        return jax.eval_shape(fn, *args)
