"""Flow matching against the official formulas written here, not shared with svi_jax.flow / svi_jax.denoise.

The reference is a transcription of DiffSynth's ``FlowMatchScheduler`` as SVI ships it
(vita-epfl/Stable-Video-Infinity ``diffsynth/schedulers/flow_match.py``, ``set_timesteps`` lines 31-49, ``step``
lines 52-63, ``add_noise`` 75-82, ``training_target`` 85-91, ``training_weight`` 94-97), built the way
``diffsynth/pipelines/svi_video.py`` line 144 does: ``FlowMatchScheduler(shift=5, sigma_min=0.0,
extra_one_step=True)``; training uses ``set_timesteps(1000, training=True)`` (``train_svi.py`` line 649), draws
``timestep_id = randint(0, num_train_timesteps)`` (line 1063) and weighs ``mse_loss(pred, target)`` by
``training_weight(timestep)`` (lines 1148-1149).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import torch

from svi_jax import flow


class OfficialFlowMatch:
    """``FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)``, in torch float32 as the official code."""

    def __init__(self, shift=5.0, sigma_max=1.0, sigma_min=0.0, num_train_timesteps=1000):
        self.shift, self.sigma_max, self.sigma_min, self.num_train_timesteps = shift, sigma_max, sigma_min, \
            num_train_timesteps

    def set_timesteps(self, num_inference_steps, denoising_strength=1.0, training=False):
        sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min) * denoising_strength
        self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps + 1)[:-1]
        self.sigmas = self.shift * self.sigmas / (1 + (self.shift - 1) * self.sigmas)
        self.timesteps = self.sigmas * self.num_train_timesteps
        if training:
            x = self.timesteps
            y = torch.exp(-2 * ((x - num_inference_steps / 2) / num_inference_steps) ** 2)
            y_shifted = y - y.min()
            self.linear_timesteps_weights = y_shifted * (num_inference_steps / y_shifted.sum())
        return self

    def step(self, model_output, timestep, sample):
        timestep_id = torch.argmin((self.timesteps - timestep).abs())
        sigma = self.sigmas[timestep_id]
        sigma_ = 0 if timestep_id + 1 >= len(self.timesteps) else self.sigmas[timestep_id + 1]
        return sample + model_output * (sigma_ - sigma)

    def add_noise(self, x0, noise, timestep):
        sigma = self.sigmas[torch.argmin((self.timesteps - timestep).abs())]
        return (1 - sigma) * x0 + sigma * noise

    def training_weight(self, timestep):
        return self.linear_timesteps_weights[torch.argmin((self.timesteps - timestep).abs())]


def test_training_tables_match_the_official_scheduler():
    ref = OfficialFlowMatch().set_timesteps(1000, training=True)
    np.testing.assert_allclose(flow.sigmas(1000, 5.0), ref.sigmas.numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(flow.timesteps(1000, 5.0), ref.timesteps.numpy(), rtol=2e-6, atol=1e-4)
    np.testing.assert_allclose(flow.training_weights(5.0), ref.linear_timesteps_weights.numpy(), rtol=1e-4,
                               atol=1e-5)
    # a few anchors of the table the official code builds: sigma_0 = 1, weights peak at t = 500, sum 1000
    assert ref.sigmas[0] == 1.0 and abs(float(ref.linear_timesteps_weights.sum()) - 1000) < 1e-2


def test_sampling_grid_matches_the_official_scheduler():
    for n in (3, 20, 50):
        ref = OfficialFlowMatch().set_timesteps(n)
        np.testing.assert_allclose(flow.sigmas(n, 5.0), ref.sigmas.numpy(), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(flow.timesteps(n, 5.0), ref.timesteps.numpy(), rtol=2e-6, atol=1e-4)


def _tiny_train_config():
    from configs import tiny

    c = tiny.get_config()
    c.model.update(dim=16, num_layers=1, num_heads=2, ffn_dim=32, freq_dim=16, text_dim=8, text_len=4, image_dim=8,
                   in_dim=4 + 4 + 4, out_dim=4)
    c.erft.enabled = False
    c.erft.shift = 5.0          # the official scheduler's shift (the tiny config trains at 1)
    c.lora.update(rank=2, alpha=2)
    return c


def _random_tree(tree, seed, scale=0.3):
    """Every leaf random (norm scales and biases included), drawn on the host (cheap to build)."""
    r = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * r.randn(*x.shape), x.dtype), tree)


def _setup(batch_size=3):
    from svi_jax import train as T
    from svi_jax.models.dit import DiTConfig, init_params

    c = _tiny_train_config()
    dcfg = DiTConfig.from_dict(c.model.to_dict())
    params = {"dit": _random_tree(jax.eval_shape(lambda: init_params(dcfg, jax.random.key(0))), 1)}
    state = jax.jit(lambda p, k: T.init_state(c, p, k))(params, jax.random.key(2))
    state = state.replace(trainable={"lora": _random_tree(state["lora"], 3)})
    r = np.random.RandomState(0)
    batch = {"x0": r.randn(batch_size, 2, 4, 4, 4).astype(np.float32),
             "y": r.randn(batch_size, 2, 4, 4, 8).astype(np.float32),
             "context": r.randn(batch_size, 4, 8).astype(np.float32),
             "clip_fea": r.randn(batch_size, 5, 8).astype(np.float32)}
    step, module, _ = T.make_train_step(c, lambda p, b, k: b)
    return c, state, batch, step, module


def test_one_train_step_loss_is_the_official_weighted_mse():
    """The step's loss against NumPy on the same batch: the official sigma/timestep/weight of each drawn id."""
    c, state, batch, step, module = _setup()
    rng = state["rng"]
    _, metrics = jax.jit(step)(state, batch)
    # the draws of this step (the step splits its key into rng, k_t, k_eps, ...): id uniform in 0..999, eps normal
    _, k_t, k_eps = jax.random.split(rng, 6)[:3]
    tid = np.asarray(jax.random.randint(k_t, (3,), 0, 1000))
    eps = np.array(jax.random.normal(k_eps, batch["x0"].shape, jnp.float32))
    ref = OfficialFlowMatch().set_timesteps(1000, training=True)
    tids = torch.from_numpy(tid.astype(np.int64))
    ts = ref.timesteps[tids]
    x_t = np.concatenate([ref.add_noise(torch.from_numpy(batch["x0"][i:i + 1]), torch.from_numpy(eps[i:i + 1]),
                                        ts[i]).numpy() for i in range(3)])
    target = eps - batch["x0"]
    fwd = jax.jit(lambda x, t: module.apply({"params": state["params"]["dit"], "lora": state["lora"]}, x, t,
                                            batch["context"], clip_fea=batch["clip_fea"], y=batch["y"]))
    v = np.asarray(fwd(x_t, ts.numpy()), np.float64)
    losses = [np.mean((v[i] - target[i]) ** 2) * float(ref.training_weight(ts[i])) for i in range(3)]
    want = float(np.mean(losses))
    print(f"train-step loss {float(metrics['loss']):.6f} vs official weighted MSE {want:.6f} (ids {tid})")
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["t_mean"]), float(ts.mean()), rtol=1e-5)


def test_training_timestep_ids_are_uniform_over_the_1000():
    """Many steps' drawn timesteps: every one in the official table, ids spread uniformly over 0..999."""
    c, state, batch, step, module = _setup(batch_size=1)
    one = {k: v[:1] for k, v in batch.items()}
    keys = jax.random.split(jax.random.key(7), 400)

    def t_of(k):
        return step(state.replace(rng=k), one)[1]["t_mean"]

    ts = np.asarray(jax.jit(jax.vmap(t_of))(keys))
    table = OfficialFlowMatch().set_timesteps(1000, training=True).timesteps.numpy()
    ids = np.array([int(np.argmin(np.abs(table - t))) for t in ts])
    np.testing.assert_allclose(ts, table[ids], rtol=1e-6)
    # uniform on 0..999: Kolmogorov-Smirnov distance of 400 draws (5% critical value 0.068)
    u = np.sort((ids + 0.5) / 1000)
    ks = np.max(np.abs(u - (np.arange(1, len(u) + 1) - 0.5) / len(u)))
    assert ks < 0.068 and ids.min() < 25 and ids.max() > 975, (ks, ids.min(), ids.max())
    # ... over all 1000 ids, not a sub-grid: 400 uniform draws hit ~330 distinct ids (sd ~7.5); 500 ids give ~275
    assert len(set(ids.tolist())) > 300, len(set(ids.tolist()))


def official_euler_grid(n, shift=5.0):
    """``shift(linspace(1, 0, n + 1)[:-1]) ++ [0]`` (float64), written here."""
    s = np.linspace(1.0, 0.0, n + 1)[:-1]
    return np.concatenate([shift * s / (1 + (shift - 1) * s), [0.0]])


def test_euler_grid_written_here_is_the_official_scheduler_loop():
    """The grid the sampler tests use (written above) drives the same loop as ``scheduler.step`` over
    ``scheduler.timesteps``, and the sampler's grid is it."""
    from svi_jax.denoise import euler_sigmas

    r = np.random.RandomState(1)
    w = torch.from_numpy(r.randn(4, 4).astype(np.float32) * 0.3)
    x = torch.from_numpy(r.randn(2, 4).astype(np.float32))
    n = 7
    grid = official_euler_grid(n)
    ref = OfficialFlowMatch().set_timesteps(n)
    xs, xo = x.clone(), x.clone()
    for t in ref.timesteps:
        xs = ref.step(torch.tanh(xs @ w) * (t / 1000.0), t, xs)
    for i in range(n):
        xo = xo + torch.tanh(xo @ w) * (1000.0 * grid[i] / 1000.0) * float(grid[i + 1] - grid[i])
    np.testing.assert_allclose(xs.numpy(), xo.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(euler_sigmas(n), grid, rtol=2e-6, atol=1e-7)
