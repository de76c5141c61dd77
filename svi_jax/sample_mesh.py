"""Sampling on a device mesh: CFG's two branches over ``data``, the tokens of the clip over ``context``.

``python -m svi_jax.sample`` uses every local device by default (``--mesh`` to choose, ``--mesh=1`` for one):

* **CFG branches over** ``data``: with guidance (``cfg_scale != 1``) the conditional and unconditional passes run
  as one batch-2 forward (``cfg_batch``) whose batch is split over ``data`` = 2, one branch per half of the devices.
* **The sequence over** ``context``: the rest of the devices split the clip's tokens (32,760 at 81x480x832);
  attention runs sequence-parallel (Ulysses: all-to-all to whole sequences of a subset of the heads; ``ring`` when
  the heads do not divide), everything else in the DiT is token-local.
* **DiT weights** sharded by the rules table (``sharding.LOGICAL_RULES``: model width over ``fsdp`` x ``context``);
  the compiler all-gathers each layer's weights before use.
* The frozen VAE / UMT5 / CLIP run un-sharded on the first local device (they run once per clip, not per step;
  the sampler's output comes back there for the decode).

The default mesh for ``N`` local devices: ``data = 2`` when CFG is on and ``N`` is even, ``context`` = the rest
(``N = 1``: no mesh, exactly the single-device program). ``--mesh data=2,context=2,fsdp=2`` etc. picks another.
The frames equal the single-device frames up to float rounding (test: ``tests/test_sample_mesh.py``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping, Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from svi_jax import sharding

log = logging.getLogger(__name__)


def parse_mesh(text: Optional[str]) -> Optional[dict]:
    """``--mesh``: ``''`` / ``None`` -> ``None`` (the default over every local device); ``1`` / ``none`` -> one
    device (``{}``); ``axis=size,...`` -> those sizes (unset axes 1, ``-1`` = the rest)."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() in ("1", "none", "off"):
        return {}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--mesh entries are axis=size (axes {', '.join(sharding.MESH_AXES)}), got {part!r}")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in sharding.MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {k!r}; the mesh axes are {', '.join(sharding.MESH_AXES)}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"--mesh: {part!r} is not axis=integer") from None
    return out


def default_sizes(num_devices: int, guided: bool) -> dict:
    """CFG's two branches over ``data`` (when guided and ``num_devices`` is even), the sequence over the rest."""
    data = 2 if guided and num_devices % 2 == 0 else 1
    return {"data": data, "fsdp": 1, "context": num_devices // data, "tensor": 1}


def _ulysses_fits(heads: int, sizes: Mapping[str, int]) -> bool:
    t, c = int(sizes.get("tensor", 1)), int(sizes.get("context", 1))
    return heads % t == 0 and (heads // t) % c == 0


def mesh_attention(impl: str, platform: str, sizes: Mapping[str, int], heads: int) -> str:
    """The attention the DiT runs with on this mesh: ``auto`` stays ``auto`` where the platform's fused kernel
    splits the sequence itself (splash / cudnn run Ulysses inside when ``context`` > 1); with a ``context`` axis
    the blockwise kernels become ``ulysses`` (``ring`` when the heads do not divide); explicit choices stay."""
    from svi_jax.models.layers import resolve_attention

    if impl != "auto" or int(sizes.get("context", 1)) == 1:
        return impl
    n = 1
    for s in sizes.values():
        n *= int(s)
    kernel = resolve_attention("auto", platform, n)
    fits = _ulysses_fits(heads, sizes)
    if kernel in ("splash", "cudnn"):
        return "auto" if fits else "ring"
    return "ulysses" if fits else "ring"


def setup(mesh_spec, dit_config, cfg_scale: float, cfg_batch: Optional[bool], devices=None):
    """``(mesh or None, dit_config, cfg_batch)`` for sampling on ``devices`` (default: every local device).

    ``mesh_spec``: ``None`` (the default mesh), a dict of axis sizes (``{}``: one device) or the ``--mesh`` text.
    One device -> ``(None, dit_config, cfg_batch)``: the single-device program, unchanged."""
    if isinstance(mesh_spec, str):
        mesh_spec = parse_mesh(mesh_spec)
    devices = list(jax.local_devices() if devices is None else devices)
    guided = float(cfg_scale) != 1.0
    if mesh_spec is not None and not mesh_spec:
        return None, dit_config, cfg_batch
    if mesh_spec is None:
        if len(devices) == 1:
            return None, dit_config, cfg_batch
        sizes = default_sizes(len(devices), guided and cfg_batch is not False)
    else:
        sizes = sharding.mesh_shape({a: 1 for a in sharding.MESH_AXES} | dict(mesh_spec), len(devices))
    if all(s == 1 for s in sizes.values()):
        return None, dit_config, cfg_batch
    branches = sizes["data"] * sizes["fsdp"]
    if branches > 1:
        if not guided:
            raise ValueError(f"--mesh puts {branches} devices on the batch (data x fsdp), but without guidance "
                             "(cfg_scale 1) a clip is one example: use the context axis (e.g. --mesh context=N)")
        if cfg_batch is False:
            raise ValueError("--mesh splits CFG's two branches over data x fsdp: that needs --cfg_batch (or a mesh "
                             "with data=1, fsdp=1)")
        if 2 % branches:
            raise ValueError(f"--mesh: data x fsdp = {branches}, but CFG has 2 branches (use 1 or 2)")
        cfg_batch = True
    mesh = sharding.make_mesh(sizes, devices=devices)
    impl = mesh_attention(dit_config.attention, devices[0].platform, sizes, dit_config.num_heads)
    if impl != dit_config.attention:
        dit_config = dataclasses.replace(dit_config, attention=impl)
    log.info("sampling on a mesh of %d devices: %s, attention %s", len(devices),
             {k: v for k, v in sizes.items() if v > 1}, impl)
    return mesh, dit_config, cfg_batch


def resolved_attention(dit_config, mesh) -> str:
    """What ``dit_config.attention`` runs as on ``mesh`` (``None``: the default backend, one device)."""
    from svi_jax.models.layers import resolve_attention

    if mesh is None:
        return resolve_attention(dit_config.attention, jax.default_backend(), 1)
    impl = resolve_attention(dit_config.attention, mesh.devices.flat[0].platform, mesh.devices.size)
    if impl in ("ulysses", "ring"):
        from svi_jax.models.attention_kernels import backend_kernel

        return f"{impl}({backend_kernel(mesh.devices.flat[0].platform)})"
    return impl


class MeshSampler:
    """``sample(params, noise, context, neg_context, clip_fea, y, lora, extra, neg_extra)`` (the unjitted
    ``svi_jax.denoise.make_sampler(..., jit=False)``) jitted on ``mesh``: DiT params by the rules table, every
    per-clip input split along its batch over ``data`` x ``fsdp`` where it divides (a batch-1 clip: replicated),
    traced under the mesh and the rules so the DiT's activation constraints and ``shard_map`` attention see it.
    The (replicated) result is returned on the first local device."""

    def __init__(self, sample_fn: Callable, mesh, dit_config, params, rules=None):
        self.sample_fn, self.mesh, self.dit_config = sample_fn, mesh, dit_config
        self.rules = sharding.LOGICAL_RULES if rules is None else rules   # config.sharding.rules
        from svi_jax.models.dit import logical_specs

        specs = sharding.dit_specs(logical_specs(dit_config), params, mesh, self.rules)
        self.param_shardings = sharding.to_shardings(specs, mesh)
        self._jits: dict = {}

    def place(self, params):
        """The DiT params split over the mesh (do it once; calls with placed params move nothing)."""
        return jax.device_put(params, self.param_shardings)

    def _batch_sharding(self, a):
        return NamedSharding(self.mesh, sharding.fit_spec(P(sharding.BATCH_AXES), a.shape, self.mesh)
                             if a.ndim else P())

    def _build(self, args):
        params, noise, *rest = args
        key = jax.tree.structure(args), tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(rest + [noise]))
        if key not in self._jits:
            rest_sh = [jax.tree.map(self._batch_sharding, a) for a in rest]
            in_sh = (self.param_shardings, self._batch_sharding(noise), *rest_sh)
            self._jits[key] = sharding.MeshJit(self.sample_fn, self.mesh, in_sh, self._batch_sharding(noise),
                                               rules=self.rules)
        return self._jits[key]

    def _placed(self, f, args):
        params, *rest = args
        return (params, *jax.device_put(tuple(rest), tuple(f.in_shardings[1:])))

    def lower(self, *args):
        f = self._build(args)
        return f.lower(*self._placed(f, args))

    def __call__(self, *args):
        f = self._build(args)
        out = f(*self._placed(f, args))
        return jax.device_put(out, jax.local_devices()[0]) if out.sharding.is_fully_replicated else out
