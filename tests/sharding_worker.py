"""Run by tests/test_sharding.py in its own process with 8 fake CPU devices (``--xla_force_host_platform_device_count
=8``). Prints ``OK <check>`` per passed check; any failure raises.

* ``attention``: ulysses / ring shard_map attention (self and cross) == plain attention, values and gradients.
* ``train``: one ERFT train step (latent batches, tiny I2V model, banks pre-filled so injection and the
  nearest-neighbour replacement both run; a warm-up step then a local step) on several meshes gives the same loss,
  LoRA, optimizer state and bank contents as the same program on one device.
"""
import os
import sys
import time

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "run via tests/test_sharding.py"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from svi_jax import sharding, train  # noqa: E402
from svi_jax.models import attention_parallel as ap  # noqa: E402
from svi_jax.models.dit import DiTConfig, init_params  # noqa: E402
from svi_jax.models.layers import attention  # noqa: E402
from svi_jax.conditioners import LatentConditioner  # noqa: E402

assert jax.device_count() == 8, jax.devices()
B = 8


def check_attention():
    mesh = sharding.make_mesh({"data": 2, "context": 2, "tensor": 2})
    for L, impl, name in ((24, "ulysses", "self"), (23, "ulysses", "self"), (24, "ulysses", "cross"),
                          (24, "ring", "self"), (23, "ring", "self"), (23, "ring", "cross")):
        keys = jax.random.split(jax.random.key(L), 5)
        q = jax.random.normal(keys[0], (2, L, 4, 8))
        w = jax.random.normal(keys[4], q.shape)
        Lk = L if name == "self" else 9
        k, v = (jax.random.normal(kk, (2, Lk, 4, 8)) for kk in keys[1:3])
        def loss(q, k, v, impl=impl):
            return jnp.sum(attention(q, k, v, impl) * w)

        def run(impl):
            f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, impl=impl), argnums=(0, 1, 2)))
            with jax.set_mesh(mesh):
                return f(q, k, v)

        (l1, g1), (l0, g0) = run(impl), run("xla")
        np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=f"{impl}/{name}")
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"{impl}/{name} grad")
        # the compiled program really communicates along 'context' for self-attention
        with jax.set_mesh(mesh):
            hlo = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, impl)).lower(q, k, v).as_text()
        want = {"ulysses": "all_to_all", "ring": "collective_permute"}[impl]
        assert (want in hlo) == (name == "self"), (impl, name, want)
    # flash with small, ragged tiles
    o = ap.flash_attention(q, k, v, block_q=5, block_k=4)
    np.testing.assert_allclose(o, attention(q, k, v, "xla"), atol=2e-6)
    print("OK attention", flush=True)


def randomized(params, seed):
    """Every parameter off its init value (norm scales off 1, biases and tables off 0), so a misplaced shard of any
    of them changes the result. Drawn on the host: cheap."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), params)


def setup(R, attention_impl="auto"):
    c = tiny.get_config()
    c.model.update(num_layers=2, dim=32, num_heads=4, ffn_dim=64, in_dim=36, out_dim=16, attention=attention_impl)
    c.erft.update(bank_replicas=R, warmup_steps=1, capacity=3, bank_dtype="float32", p_insert_clean=0.5)
    c.lora.update(rank=4, alpha=4)
    cond = LatentConditioner(c)
    params = {"dit": randomized(init_params(DiTConfig.from_dict(c.model.to_dict()), jax.random.key(1)), 1)}
    state = train.init_state(c, params, jax.random.key(2))
    # make B (the LoRA up-projection) nonzero so the LoRA path matters, and pre-fill the banks
    lora = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(a.size), a.shape), state["lora"])
    rng = np.random.default_rng(0)
    banks = {}
    for name, bank in state["banks"].items():
        errors = rng.normal(size=bank.errors.shape).astype(np.float32)
        count = rng.integers(0, bank.capacity + 1, size=bank.count.shape).astype(np.int32)
        count.reshape(-1, 50)[:, :25] = bank.capacity  # per replica, the high-noise half full: replacements
        banks[name] = bank._replace(errors=jnp.asarray(errors), count=jnp.asarray(count))
    state = state.replace(trainable={"lora": lora}, banks=banks)
    F, H, W, C = train.latent_shape(c)
    k = jax.random.split(jax.random.key(3), 4)
    batch = {"latents": jax.random.normal(k[0], (B, F, H, W, C)),
             "y": jax.random.normal(k[1], (B, F, H, W, C + 4)),
             "context": jax.random.normal(k[2], (B, 7, c.model.text_dim)),
             "clip_fea": jax.random.normal(k[3], (B, 257, c.model.image_dim))}
    step, _, tx = train.make_train_step(c, cond.prepare)
    return c, state, batch, step, tx


def two_steps(f, state, batch):
    s1, m1 = f(state, batch)
    s2, m2 = f(s1, batch)
    return jax.device_get((s2, m1, m2))


def compare(got, want, what):
    (s, m1, m2), (rs, rm1, rm2) = got, want
    for m, rm in ((m1, rm1), (m2, rm2)):
        np.testing.assert_allclose(m["loss"], rm["loss"], rtol=1e-5, err_msg=f"{what}: loss")
        np.testing.assert_allclose(m["grad_norm"], rm["grad_norm"], rtol=1e-4, err_msg=f"{what}: grad norm")
    assert float(m1["rate_latent_injected"]) > 0, "no error was injected: the check would be vacuous"
    for key in ("lora", "opt", "banks"):
        flat, ref = jax.tree_util.tree_flatten_with_path(s[key])[0], jax.tree.leaves(rs[key])
        for (path, a), b in zip(flat, ref):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-5, rtol=1e-4,
                                       err_msg=f"{what}: {key}{jax.tree_util.keystr(path)}")
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s["lora"]), jax.tree.leaves(want_initial_lora[0])))
    assert moved > 1e-5, "the LoRA did not change"


want_initial_lora = []


def check_train():
    meshes = [  # (mesh, bank replicas, attention); R == mesh data size: shard_map banks, else vmap under GSPMD
        ({"data": 8}, 2, "auto"),
        ({"data": 2, "fsdp": 4}, 2, "auto"),
        ({"data": 2, "fsdp": 2, "context": 2}, 2, "ulysses"),
        ({"data": 2, "context": 2, "tensor": 2}, 2, "ring"),  # tensor parallel + ring attention
    ]
    refs = {}
    for mesh_cfg, R, impl in meshes:
        t0 = time.time()
        c, state, batch, step, tx = setup(R, impl)
        if not want_initial_lora:
            want_initial_lora.append(jax.device_get(state["lora"]))
        if R not in refs:  # the same program on one device (vmap over the bank replicas)
            refs[R] = two_steps(jax.jit(step), state, batch)
        mesh = sharding.make_mesh(mesh_cfg)
        f = train.TrainStep(step, mesh, train.state_shardings(c, state, mesh, tx))
        st = jax.device_put(state, f.state_shardings)
        bt = jax.device_put(batch, sharding.to_shardings(sharding.batch_specs(batch, mesh), mesh))
        # the state really is distributed as the rules say
        bank = st["banks"]["noise"].errors
        if mesh_cfg["data"] == R:  # one replica's banks per data slice
            assert bank.sharding.spec[0] == "data" and bank.addressable_shards[0].data.shape[0] == 50
        assert len({s.device for s in bank.addressable_shards}) == 8
        kernel = st["params"]["dit"]["blocks"]["ffn"]["0"]["kernel"]
        want = sharding.fit_spec(jax.sharding.PartitionSpec(None, ("fsdp", "context"), "tensor"), kernel.shape, mesh)
        assert kernel.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), 3), kernel.sharding.spec
        compare(two_steps(f, st, bt), refs[R], f"mesh {mesh_cfg}")
        print(f"OK train {mesh_cfg} ({time.time() - t0:.1f}s)", flush=True)


def check_sample():
    """The flow-matching sampler (CFG, 3 Euler steps) on a data x fsdp x context mesh (ulysses attention, weights
    FSDP-sharded) gives the same latents as on one device (the VAE decode after it is a deterministic function of
    the latents, so the same latents are the same video)."""
    from svi_jax import denoise as sampler, sample_mesh

    c = tiny.get_config()
    c.model.update(num_layers=2, dim=32, num_heads=4, ffn_dim=64, in_dim=36, out_dim=16)
    cfg = DiTConfig.from_dict(c.model.to_dict())
    params = randomized(init_params(cfg, jax.random.key(5)), 5)
    k = jax.random.split(jax.random.key(6), 5)
    noise = jax.random.normal(k[0], (4, 3, 6, 10, 16))
    ctx, neg = jax.random.normal(k[1], (4, 7, cfg.text_dim)), jax.random.normal(k[2], (4, 5, cfg.text_dim))
    clip, y = jax.random.normal(k[3], (4, 257, cfg.image_dim)), jax.random.normal(k[4], (4, 3, 6, 10, 20))
    want = sampler.make_sampler(cfg, num_steps=3, cfg_scale=5.0)(params, noise, ctx, neg, clip, y)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "context": 2})
    cfg_u = DiTConfig.from_dict(dict(c.model.to_dict(), attention="ulysses"))
    fn = sample_mesh.MeshSampler(sampler.make_sampler(cfg_u, num_steps=3, cfg_scale=5.0, jit=False), mesh, cfg_u,
                                 params)
    got = fn(params, noise, ctx, neg, clip, y)
    assert got.sharding.spec[0] == ("data", "fsdp"), got.sharding
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, rtol=1e-4)
    print("OK sample", flush=True)


def check_rules():
    """``config.sharding.rules`` is the table the trainer's state and step use: with 'embed' unsharded, the DiT's
    width-sharded kernels are replicated over fsdp in ``train.build``'s abstract state and the step carries it."""
    from svi_jax.train.builder import build

    def kernel_specs(rules=None):
        c = tiny.get_config()
        c.model.update(num_layers=2, dim=32, num_heads=4, ffn_dim=64, in_dim=36, out_dim=16)
        if rules is not None:
            c.sharding.rules = rules
        built = build(c, sharding.make_mesh({"fsdp": 8}), abstract=True)
        ffn = built.shardings.frozen["dit"]["blocks"]["ffn"]["0"]["kernel"].spec
        return ffn, built.step.rules

    ffn, rules = kernel_specs()
    assert "fsdp" in str(ffn) and rules == sharding.LOGICAL_RULES, (ffn, rules)
    custom = tuple((n, None if n == "embed" else t) for n, t in sharding.LOGICAL_RULES)
    ffn2, rules2 = kernel_specs(custom)
    assert "fsdp" not in str(ffn2) and rules2 == custom, (ffn2, rules2)
    print("OK rules", flush=True)


def main():
    which = sys.argv[1:] or ["attention", "sample", "train", "rules"]
    if "rules" in which:
        check_rules()
    if "attention" in which:
        check_attention()
    if "sample" in which:
        check_sample()
    if "train" in which:
        check_train()


if __name__ == "__main__":
    main()
