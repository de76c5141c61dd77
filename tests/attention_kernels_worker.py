"""Run by tests/test_attention_kernels.py in its own process with 4 fake CPU devices. Splash attention (Pallas
interpret mode) inside ``shard_map``: on a mesh with ``context`` 2 x ``tensor`` 2 (Ulysses all-to-all, heads over
``tensor``; cross-attention with the queries split) and on ``data`` 2 x ``tensor`` 2 (batch and heads split), forward
and gradients against the float64 reference. Prints ``OK splash-mesh``; any failure raises."""
import os
import sys

assert "xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", ""), "run via the test"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from svi_jax import sharding  # noqa: E402
from svi_jax.models.layers import attention  # noqa: E402
from tests.test_attention_kernels import inputs, reference, rel  # noqa: E402

assert jax.device_count() == 4, jax.devices()

for mesh_cfg in ({"context": 2, "tensor": 2}, {"data": 2, "tensor": 2}):
    mesh = sharding.make_mesh(mesh_cfg)
    for lq, lk in ((45, 45), (45, 257)):
        q, k, v, w = inputs(lq, lk, heads=4, d=8, seed=lk)
        f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attention(q, k, v, "splash") * w), argnums=(0, 1, 2)))
        g = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))
        with jax.set_mesh(mesh):
            o = g(q, k, v)
            _, grads = f(q, k, v)
            hlo = g.lower(q, k, v).as_text()
        o_ref, g_ref = reference(q, k, v, w)
        assert rel(o, o_ref) <= 1e-5, (mesh_cfg, lq, lk, rel(o, o_ref))
        for name, a, b in zip("qkv", grads, g_ref):
            assert rel(a, b) <= 1e-5, (mesh_cfg, lq, lk, name, rel(a, b))
        want_a2a = mesh_cfg.get("context", 1) > 1 and lq == lk
        assert ("all_to_all" in hlo) == want_a2a, (mesh_cfg, lq, lk)
        assert "shard_map" in hlo or "manual" in hlo.lower(), "splash must run per device inside shard_map"
print("OK splash-mesh", flush=True)
