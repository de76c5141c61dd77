"""Error injection and curation against direct computation of the official formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax import erft, flow
from svi_jax.erft import curate, erft_config, grid_of, init_bank, inject, insert_many

F, H, W, C = 4, 2, 3, 4
SHAPE = (F, H, W, C)
G = 50
GRID_T = flow.timesteps(G, 5.0)


def one_entry_per_grid(seed, capacity=3, dtype=jnp.float32):
    """A bank holding exactly one distinct error at every grid: entry of grid g is ``pattern[g]``."""
    pattern = np.random.default_rng(seed).normal(size=(G,) + SHAPE).astype(np.float32)
    bank = insert_many(init_bank(G, capacity, SHAPE, dtype), np.arange(G, dtype=np.int32), pattern)
    return bank, pattern


def batch(B, seed=0, with_y=True):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(B,) + SHAPE).astype(np.float32)
    eps = rng.normal(size=(B,) + SHAPE).astype(np.float32)
    y = rng.normal(size=(B, F, H, W, 4 + C)).astype(np.float32) if with_y else None
    gi = rng.integers(0, G, size=B)
    t = (GRID_T[gi] + rng.uniform(-0.2, 0.2, size=B)).astype(np.float32)  # near, not on, the grid timesteps
    sigma = (t / 1000.0).astype(np.float32)
    return x0, y, eps, t, sigma, gi


def s_(v):
    return v[:, None, None, None, None]


def cfg(**kw):
    base = dict(p_noise=0.0, p_latent=0.0, p_image=0.0, p_clean=0.0, y_error_num=2)
    return erft_config(**{**base, **kw})


@pytest.fixture(scope="module")
def banks():
    nb, npat = one_entry_per_grid(1)
    lb, lpat = one_entry_per_grid(2)
    return {"noise": nb, "latent": lb}, npat, lpat




def _inject(key, banks, x0, y, eps, t, sigma, c):
    # ConfigDicts are not hashable; close over the config instead.
    return jax.jit(lambda k, b, a, yy, e, tt, ss: inject(k, b, a, yy, e, tt, ss, c))(key, banks, x0, y, eps, t, sigma)


def test_grids_of_batch(banks):
    x0, y, eps, t, sigma, gi = batch(16)
    np.testing.assert_array_equal(np.asarray(grid_of(t)), gi)


def test_clean_case(banks):
    bs, _, _ = banks
    x0, y, eps, t, sigma, _ = batch(6)
    x_t, target, y_new, info = _inject(jax.random.key(0), bs, x0, y, eps, t, sigma,
                                       cfg(p_clean=1.0, p_noise=1.0, p_latent=1.0, p_image=1.0))
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * x0 + s_(sigma) * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(target, eps - x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_new, y)
    np.testing.assert_array_equal(info["clean"], 1.0)
    for k in ("noise_injected", "latent_injected", "image_injected"):
        np.testing.assert_array_equal(info[k], 0.0)
        assert info[k].dtype == jnp.float32


def test_noise_case(banks):
    bs, npat, _ = banks
    x0, y, eps, t, sigma, gi = batch(6, seed=1)
    x_t, target, y_new, info = _inject(jax.random.key(1), bs, x0, y, eps, t, sigma, cfg(p_noise=1.0))
    e_n = npat[gi]
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * x0 + s_(sigma) * (eps + e_n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(target, eps + e_n - x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y_new, y)
    np.testing.assert_array_equal(info["noise_injected"], 1.0)
    np.testing.assert_array_equal(info["latent_injected"], 0.0)


def test_latent_case(banks):
    bs, _, lpat = banks
    x0, y, eps, t, sigma, gi = batch(6, seed=2)
    x_t, target, y_new, info = _inject(jax.random.key(2), bs, x0, y, eps, t, sigma, cfg(p_latent=1.0))
    e_x = lpat[gi]
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * (x0 + e_x) + s_(sigma) * eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(target, eps - x0, rtol=1e-5, atol=1e-5)  # the target still points at x0
    np.testing.assert_array_equal(y_new, y)
    np.testing.assert_array_equal(info["latent_injected"], 1.0)


def test_latent_error_is_gated_on_the_latent_banks_grid(banks):
    """docs/erft.md "Where we differ" item 4: the latent error is drawn whenever the latent bank's grid holds an
    entry, whatever the noise bank holds (the official code gates on the noise bank's grid)."""
    bs, npat, lpat = banks
    empty = init_bank(G, 3, SHAPE, jnp.float32)
    x0, y, eps, t, sigma, gi = batch(6, seed=7)
    c = cfg(p_latent=1.0)
    # noise bank empty, latent bank filled: injected here (the official code would not)
    x_t, _, _, info = _inject(jax.random.key(7), {"noise": empty, "latent": bs["latent"]}, x0, y, eps, t, sigma, c)
    np.testing.assert_array_equal(info["latent_injected"], 1.0)
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * (x0 + lpat[gi]) + s_(sigma) * eps, rtol=1e-5, atol=1e-5)
    # noise bank filled, latent bank empty: nothing injected (the official code adds zeros: the same x_t)
    x_t, _, _, info = _inject(jax.random.key(7), {"noise": bs["noise"], "latent": empty}, x0, y, eps, t, sigma, c)
    np.testing.assert_array_equal(info["latent_injected"], 0.0)
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * x0 + s_(sigma) * eps, rtol=1e-6, atol=1e-6)


def test_image_case_window_from_pooled_bank():
    """A single stored error in the whole latent bank: y's first n frames of latent channels get a window."""
    single = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    lb = insert_many(init_bank(G, 2, SHAPE, jnp.float32), np.array([17], np.int32), single[None])
    bs = {"noise": init_bank(G, 2, SHAPE, jnp.float32), "latent": lb}
    B, n = 64, 2
    x0, y, eps, t, sigma, _ = batch(B, seed=3)
    x_t, target, y_new, info = _inject(jax.random.key(3), bs, x0, y, eps, t, sigma, cfg(p_image=1.0, y_error_num=n))
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * x0 + s_(sigma) * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(info["image_injected"], 1.0)
    y_new = np.asarray(y_new)
    np.testing.assert_array_equal(y_new[..., :4], y[..., :4])  # mask untouched
    np.testing.assert_array_equal(y_new[:, n:], y[:, n:])  # frames past the window untouched
    delta = y_new[:, :n, ..., 4:] - y[:, :n, ..., 4:]
    windows = np.stack([single[s:s + n] for s in range(F - n + 1)])
    starts = []
    for b in range(B):
        err = np.abs(windows - delta[b]).reshape(len(windows), -1).max(1)
        assert err.min() < 1e-5, f"example {b}: y delta is no window of the stored error"
        starts.append(int(err.argmin()))
    assert set(starts) == set(range(F - n + 1))  # every start 0..F-n occurs


def test_intensity_factor(banks):
    bs, npat, _ = banks
    f = 0.5
    x0, y, eps, t, sigma, gi = batch(32, seed=4)
    _, target, _, _ = _inject(jax.random.key(4), bs, x0, y, eps, t, sigma, cfg(p_noise=1.0, error_modulate_factor=f))
    ratio = (np.asarray(target) - (eps - x0)) / npat[gi]
    c = ratio.reshape(32, -1)
    np.testing.assert_allclose(c, c[:, :1].repeat(c.shape[1], 1), rtol=1e-3)  # one factor per example
    assert np.all((c[:, 0] >= 1 - f - 1e-4) & (c[:, 0] <= 1 + f + 1e-4))
    assert c[:, 0].std() > 0.1  # it does vary


def test_empty_banks_and_t2v_inject_nothing():
    bs = erft.init_banks(SHAPE, num_grids=G, capacity=2, dtype=jnp.float32)
    x0, y, eps, t, sigma, _ = batch(5, seed=5)
    c = cfg(p_noise=1.0, p_latent=1.0, p_image=1.0)
    x_t, target, y_new, info = _inject(jax.random.key(5), bs, x0, y, eps, t, sigma, c)
    np.testing.assert_allclose(x_t, (1 - s_(sigma)) * x0 + s_(sigma) * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y_new, y)
    assert sum(float(v.sum()) for v in info.values()) == 0.0

    x_t, target, y_new, info = jax.jit(lambda k, b, a, e, tt, ss: inject(k, b, a, None, e, tt, ss, c))(
        jax.random.key(5), bs, x0, eps, t, sigma)
    assert y_new is None and float(info["image_injected"].sum()) == 0.0


def test_probabilities(banks):
    """Independent draws; clean cancels all three. Frequencies within 5 standard errors."""
    bs, _, _ = banks
    B = 8000
    p = dict(p_clean=0.3, p_noise=0.2, p_latent=0.6, p_image=0.5)
    x0, y, eps, t, sigma, _ = batch(B, seed=6)
    *_, info = _inject(jax.random.key(6), bs, x0, y, eps, t, sigma, cfg(**p))
    info = {k: np.asarray(v) > 0.5 for k, v in info.items()}
    keep = 1 - p["p_clean"]

    def check(mask, prob):
        se = np.sqrt(prob * (1 - prob) / B)
        assert abs(mask.mean() - prob) < 5 * se, (mask.mean(), prob)

    check(info["clean"], p["p_clean"])
    check(info["noise_injected"], keep * p["p_noise"])
    check(info["latent_injected"], keep * p["p_latent"])
    check(info["image_injected"], keep * p["p_image"])
    check(info["noise_injected"] & info["latent_injected"], keep * p["p_noise"] * p["p_latent"])
    check(info["image_injected"] & info["latent_injected"], keep * p["p_image"] * p["p_latent"])
    assert not np.any(info["clean"] & (info["noise_injected"] | info["latent_injected"] | info["image_injected"]))


# ------------------------------------------------------------------------------------------ curation


def official_step(model_output, sigma, sample, self_corr):
    """FlowMatchScheduler.step(.., to_final=True): integrate to sigma 1 (self_corr) or 0 in one step."""
    target_sigma = 1.0 if self_corr else 0.0
    return sample + model_output * (target_sigma - s_(sigma))


def test_error_formulas_match_official_one_step_integration():
    rng = np.random.default_rng(7)
    v_pred, target, x_t = (rng.normal(size=(3,) + SHAPE).astype(np.float32) for _ in range(3))
    sigma = np.array([0.05, 0.5, 0.97], np.float32)
    e_n, e_x = erft.errors_from_prediction(v_pred, target, sigma)
    want_n = official_step(v_pred, sigma, x_t, True) - official_step(target, sigma, x_t, True)
    want_x = official_step(v_pred, sigma, x_t, False) - official_step(target, sigma, x_t, False)
    np.testing.assert_allclose(e_n, want_n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e_x, want_x, rtol=1e-4, atol=1e-5)


def _curate(key, bs, t, sigma, v_pred, target, info, step, c):
    return jax.jit(lambda k, b, *a: curate(k, b, *a, c), donate_argnums=1)(key, bs, t, sigma, v_pred, target, info, step)


def _stored(bank, g):
    return np.asarray(erft.decode(bank.errors[g], bank.scale[g] if bank.scale is not None else None))[: int(bank.count[g])]


def test_curate_inserts_errors_in_order():
    rng = np.random.default_rng(8)
    B = 4
    gi = np.array([3, 10, 3, 41])  # two examples on the same grid
    t = GRID_T[gi].astype(np.float32)
    sigma = (t / 1000).astype(np.float32)
    v_pred, target = (rng.normal(size=(B,) + SHAPE).astype(np.float32) for _ in range(2))
    v_pred[3, 0, 0, 0, 1] = np.nan  # never inserted
    info = {"clean": np.zeros(B, np.float32)}
    bs = erft.init_banks(SHAPE, num_grids=G, capacity=3, dtype=jnp.float32)
    out = _curate(jax.random.key(0), bs, t, sigma, v_pred, target, info, 0, cfg())
    d = v_pred - target
    e_n, e_x = (1 - s_(sigma)) * d, -s_(sigma) * d
    for name, e in (("noise", e_n), ("latent", e_x)):
        bank = out[name]
        counts = np.zeros(G, int)
        counts[[3, 10]] = [2, 1]
        np.testing.assert_array_equal(bank.count, counts)
        np.testing.assert_allclose(_stored(bank, 3), e[[0, 2]], rtol=1e-6)
        np.testing.assert_allclose(_stored(bank, 10), e[[1]], rtol=1e-6)


def test_curate_clean_gate():
    B = 4000
    rng = np.random.default_rng(9)
    shape = (1, 1, 1, 2)
    v_pred, target = (rng.normal(size=(B,) + shape).astype(np.float32) for _ in range(2))
    t = rng.uniform(0, 1000, size=B).astype(np.float32)
    sigma = t / 1000
    clean = (np.arange(B) % 2).astype(np.float32)  # odd examples used a clean input
    c = cfg(p_insert_clean=0.1)
    bs = erft.init_banks(shape, num_grids=G, capacity=B, dtype=jnp.float32)
    out = _curate(jax.random.key(1), bs, t, sigma, v_pred, target, {"clean": clean}, 0, c)
    inserted = int(out["noise"].count.sum())
    n_clean = B // 2
    expected = (B - n_clean) + 0.1 * n_clean
    assert abs(inserted - expected) < 5 * np.sqrt(n_clean * 0.09)
    assert int(out["latent"].count.sum()) == inserted

    for p, want in ((0.0, B - n_clean), (1.0, B)):
        bs = erft.init_banks(shape, num_grids=G, capacity=B, dtype=jnp.float32)
        out = _curate(jax.random.key(2), bs, t, sigma, v_pred, target, {"clean": clean}, 0, cfg(p_insert_clean=p))
        assert int(out["noise"].count.sum()) == want


def test_round_trip_inject_then_curate_under_jit_int8():
    """One jitted step with donated int8 banks: inject, a fake forward, curate; errors come back in."""
    bs = erft.init_banks(SHAPE, num_grids=G, capacity=2, dtype=jnp.int8)
    c = cfg(p_noise=0.5, p_latent=0.9, p_image=0.9, p_clean=0.2)

    @jax.jit
    def step(key, bs, x0, y, eps, t, sigma, i):
        k1, k2 = jax.random.split(key)
        x_t, target, y_new, info = inject(k1, bs, x0, y, eps, t, sigma, c)
        v_pred = 0.9 * target + 0.01 * x_t  # stands in for the model
        return curate(k2, bs, t, sigma, v_pred, target, info, i, c), info

    step = jax.jit(step, donate_argnums=1)
    for i in range(6):
        x0, y, eps, t, sigma, _ = batch(3, seed=10 + i)
        bs, info = step(jax.random.key(i), bs, x0, y, eps, t, sigma, i)
    assert int(bs["noise"].count.sum()) > 0
    assert bs["noise"].errors.dtype == jnp.int8 and bs["noise"].scale.shape == (G, 2)


def test_no_gradient_through_curation():
    rng = np.random.default_rng(11)
    v_pred, target = (rng.normal(size=(2,) + SHAPE).astype(np.float32) for _ in range(2))
    t = GRID_T[[1, 2]].astype(np.float32)

    def f(v):
        bs = erft.init_banks(SHAPE, num_grids=G, capacity=2, dtype=jnp.float32)
        out = curate(jax.random.key(0), bs, t, t / 1000, v, target, {"clean": jnp.zeros(2)}, 0, cfg())
        return out["noise"].errors.sum() + out["latent"].errors.sum()

    assert float(f(v_pred)) != 0.0
    np.testing.assert_array_equal(jax.grad(f)(jnp.asarray(v_pred)), 0.0)


def test_bad_inputs_fail_clearly(banks):
    bs, _, _ = banks
    x0, y, eps, t, sigma, _ = batch(2)
    with pytest.raises(ValueError, match="y_error_num"):
        inject(jax.random.key(0), bs, x0, y, eps, t, sigma, cfg(y_error_num=F + 1))
    with pytest.raises(ValueError, match="bank entries have shape"):
        inject(jax.random.key(0), bs, x0[:, :2], y, eps[:, :2], t, sigma, cfg())
    with pytest.raises(ValueError, match="unknown ERFT config"):
        erft_config(p_nois=0.1)
