"""SVI 2.0 Pro training (our recipe; no official code exists): expert-restricted timesteps and bank grids
(statistical), the Pro conditioning, the anchor from outside the clip, and a tiny train step per expert."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax import erft, flow
from svi_jax.data import windows
from svi_jax.pro_train import expert_grids, split_index, timestep_id_range

B875 = np.float32(875.0)


def _cfg(expert):
    from configs import pro_tiny

    return pro_tiny.get_config(expert)


def test_expert_sides_of_the_grids_and_of_the_timestep_table():
    assert split_index(0.875, 50, 5.0) == 21
    assert expert_grids("high", 0.875, 50, 5.0) == (0, 21) and expert_grids("low", 0.875, 50, 5.0) == (21, 29)
    full = flow.timesteps(50, 5.0)
    hi, lo = erft.grid_timesteps(21, 5.0, 0, 50), erft.grid_timesteps(29, 5.0, 21, 50)
    assert (hi >= B875).all() and (lo < B875).all() and np.array_equal(np.concatenate([hi, lo]), full)
    t = flow.timesteps(1000, 5.0)
    (a, b), (c, d) = timestep_id_range(_cfg("high"), 5.0), timestep_id_range(_cfg("low"), 5.0)
    assert a == 0 and b == c and d == 1000
    assert (t[a:b] >= B875).all() and (t[c:d] < B875).all()
    with pytest.raises(ValueError, match="expert must be one of"):
        expert_grids("mid", 0.875, 50, 5.0)
    bad = _cfg("high")
    bad.pro.expert = "low"                      # changed without apply_expert: the grids are the high side
    with pytest.raises(ValueError, match="not the low-noise side"):
        timestep_id_range(bad, 5.0)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_timestep_draw_and_bank_grids_statistics(expert):
    """The train step's draw (randint over the expert's id range, t = the table's value) conditioned on the side,
    and the grids those timesteps land in (nearest of the expert's slice), against the exact expected shares."""
    c = _cfg(expert)
    lo, hi = timestep_id_range(c, 5.0)
    t_tab = flow.timesteps(1000, 5.0)
    n = 40000
    tid = np.asarray(jax.random.randint(jax.random.key(3), (n,), lo, hi))
    t = t_tab[tid]
    assert ((t >= B875) if expert == "high" else (t < B875)).all()
    # ids uniform on the side: chi-square over 10 equal bins of the id range (df 9; 99.9% quantile 27.9)
    counts = np.histogram(tid, bins=10, range=(lo, hi))[0]
    exp = n * np.diff(np.linspace(lo, hi, 11).round()) / (hi - lo)
    assert ((counts - exp) ** 2 / exp).sum() < 27.9
    e = c.erft
    grid = np.asarray(erft.grid_of(jnp.asarray(t), e.num_grids, e.shift, e.grid_offset, e.grid_steps))
    table = erft.grid_timesteps(e.num_grids, e.shift, e.grid_offset, e.grid_steps)
    assert grid.min() >= 0 and grid.max() < e.num_grids
    want_grid = np.argmin(np.abs(table[None] - t_tab[lo:hi, None]), axis=1)   # nearest grid of each id on the side
    share = np.bincount(want_grid, minlength=e.num_grids) / (hi - lo)
    got = np.bincount(grid, minlength=e.num_grids) / n
    assert (share > 0).all()                                                  # every grid of the side is reached
    assert np.abs(got - share).max() < 4 * np.sqrt(share.max() / n) + 1e-3


def test_image_error_goes_to_the_motion_latent_only():
    shape = (3, 4, 4, 4)
    banks = erft.init_banks(shape, 2, 2, jnp.float32)
    banks = {k: erft.insert(b, 0, jnp.ones(shape)) for k, b in banks.items()}
    x0 = jnp.zeros((1,) + shape)
    y = jnp.zeros((1, 3, 4, 4, 8))
    cfg = dict(p_clean=0.0, p_image=1.0, p_latent=0.0, p_noise=0.0, y_error_num=1, y_error_start=1, num_grids=2)
    _, _, y_new, info = erft.inject(jax.random.key(0), banks, x0, y, x0, jnp.array([990.0]), jnp.array([0.99]), cfg)
    assert info["image_injected"][0] == 1
    d = np.asarray(y_new - y)
    assert (d[0, 1, ..., 4:] == 1).all() and np.abs(d[0, [0, 2]]).max() == 0 and np.abs(d[..., :4]).max() == 0


def test_anchor_is_drawn_outside_the_clip():
    rng = np.random.default_rng(0)
    for _ in range(300):
        total, stride, num_real = int(rng.integers(20, 60)), int(rng.integers(1, 3)), 9
        start = int(rng.integers(0, total - stride * (num_real - 1)))
        a = windows.outside_frame(total, start, stride, num_real, rng)
        assert 0 <= a < total and not start <= a <= start + stride * (num_real - 1)
    assert windows.outside_frame(9, 0, 1, 9, rng) in range(9)         # nothing outside: a frame of the window
    from svi_jax.data.config import default_config

    d = default_config(num_frames=9, height=8, width=8)
    plain = windows.plan_clip(40, 16, 16, d, np.random.default_rng(5))
    d.anchor = "outside"
    pro = windows.plan_clip(40, 16, 16, d, np.random.default_rng(5))
    assert pro.anchor >= 0 and pro.start == plain.start and pro.crop == plain.crop and pro.pad_frame == plain.pad_frame


@pytest.fixture(scope="module")
def batch():
    r = np.random.RandomState(0)
    return {"caption": np.array(["a boat"], dtype=object),
            "video": r.uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32),
            "anchor": r.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)}


@pytest.mark.parametrize("expert", ["high", "low"])
def test_train_step_per_expert(expert, batch):
    from svi_jax import lora as lora_lib
    from svi_jax import pipeline, train

    c = _cfg(expert)
    c.erft.update(p_clean=0.0, p_latent=1.0, warmup_steps=0)
    cond = pipeline.make_conditioner(c)
    assert type(cond).__name__ == "ProConditioner" and "clip" not in cond.params
    db = cond.device_batch(batch)
    inputs = cond.prepare(cond.params, db, jax.random.key(0))
    x0 = np.asarray(inputs["x0"])
    anchor = np.asarray(cond.codec.encode(cond.params["vae"], db["anchor"][:, None]))
    y = np.asarray(inputs["y"])
    np.testing.assert_array_equal(y[0, 0, ..., 4:], anchor[0, 0])
    np.testing.assert_array_equal(y[0, 1, ..., 4:], x0[0, 1])
    assert np.abs(y[0, 2:, ..., 4:]).max() == 0 and inputs["clip_fea"] is None
    key = jax.random.key(int(c.train.seed))
    params = {"dit": train.load_frozen_params(c, key), **cond.params}
    state = train.init_state(c, params, jax.random.fold_in(key, 2))
    assert state["banks"]["noise"].num_grids == (21 if expert == "high" else 29)
    step = jax.jit(train.make_train_step(c, cond.prepare)[0])
    lora0 = jax.device_get(state["lora"])
    ts = []
    for _ in range(3):
        state, m = step(state, db)
        ts.append(float(m["t_mean"]))
        assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == 0
    ts = np.array(ts)
    assert ((ts >= 875) if expert == "high" else (ts < 875)).all(), ts
    assert int(np.sum(np.asarray(state["banks"]["noise"].count))) == 3             # one error per step, its side
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state["lora"], lora0)
    assert max(jax.tree.leaves(moved)) > 0
    assert set(lora_lib.DEFAULT_TARGETS) == set(c.lora.targets)
