"""Error banks: a NumPy reference of the official list-based buffers vs the jitted fixed-shape banks."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy import stats

from svi_jax import erft
from svi_jax.erft import Bank, draw, draw_pooled, grid_of, init_bank, insert, insert_many

SHAPE = (2, 3, 4)


# ------------------------------------------------------------------------------------- NumPy reference


def ref_stored(e, dtype):
    """The value a bank of ``dtype`` keeps for ``e`` (float32), or None if it must not be stored."""
    e = np.asarray(e, np.float32)
    if not np.all(np.isfinite(e)):
        return None
    if dtype == "int8":
        scale = np.float32(np.max(np.abs(e)) / np.float32(127.0))
        q = np.clip(np.round(e / (scale if scale > 0 else np.float32(1.0))), -127, 127).astype(np.int8)
        return q.astype(np.float32) * scale
    if dtype == "bf16":
        s = e.astype(ml_dtypes.bfloat16).astype(np.float32)
        return s if np.all(np.isfinite(s)) else None
    return e


class RefBank:
    """The official ``l2_batch`` buffer: Python lists per grid, append below K, else replace the nearest."""

    def __init__(self, num_grids, capacity, dtype):
        self.lists = [[] for _ in range(num_grids)]
        self.capacity, self.dtype = capacity, dtype

    def insert(self, grid, error, valid=True):
        s = ref_stored(error, self.dtype)
        if not valid or s is None:
            return
        entries = self.lists[grid]
        if len(entries) < self.capacity:
            entries.append(s)
        else:
            d = [np.sum((x.astype(np.float64) - s.astype(np.float64)) ** 2) for x in entries]
            entries[int(np.argmin(d))] = s


def bank_lists(bank: Bank):
    errors = np.asarray(erft.decode(bank.errors, bank.scale))
    count = np.asarray(bank.count)
    return [errors[g, : count[g]] for g in range(bank.num_grids)]


def assert_same(bank: Bank, ref: RefBank):
    got = bank_lists(bank)
    assert [len(x) for x in got] == [len(x) for x in ref.lists]
    for g, (a, b) in enumerate(zip(got, ref.lists)):
        if b:
            np.testing.assert_array_equal(a, np.stack(b), err_msg=f"grid {g}")


def random_sequence(rng, n, num_grids):
    """Errors that cluster around a few patterns (so replacements are non-trivial), on skewed grids."""
    patterns = rng.normal(size=(5,) + SHAPE) * rng.uniform(0.5, 3.0, size=(5, 1, 1, 1))
    grids = np.minimum(rng.geometric(0.35, size=n) - 1, num_grids - 1).astype(np.int32)
    errors = (patterns[rng.integers(0, 5, size=n)] + 0.3 * rng.normal(size=(n,) + SHAPE)).astype(np.float32)
    errors[rng.random(n) < 0.05, 0, 0, 0] = np.nan
    errors[rng.random(n) < 0.03, 1, 0, 0] = np.inf
    valid = rng.random(n) > 0.1
    return grids, errors, valid


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.int8}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_insert_matches_reference_stepwise_and_batched(dtype):
    rng = np.random.default_rng(1234 + len(dtype))
    G, K, n = 7, 4, 260
    grids, errors, valid = random_sequence(rng, n, G)
    ref = RefBank(G, K, dtype)
    for g, e, v in zip(grids, errors, valid):
        ref.insert(int(g), e, bool(v))
    assert max(len(x) for x in ref.lists) == K  # the sequence goes well past capacity

    step = jax.jit(insert, donate_argnums=0)
    bank = init_bank(G, K, SHAPE, DTYPES[dtype])
    for g, e, v in zip(grids, errors, valid):
        bank = step(bank, g, e, v)
    assert_same(bank, ref)

    many = jax.jit(insert_many, donate_argnums=0)(init_bank(G, K, SHAPE, DTYPES[dtype]), grids, errors, valid)
    assert_same(many, ref)
    assert many.errors.dtype == jnp.dtype(DTYPES[dtype])
    assert (many.scale is not None) == (dtype == "int8")


def test_insert_unseen_sequence_many_grids():
    """A longer sequence with a different generator, capacity 1 and 3, every grid past capacity."""
    rng = np.random.default_rng(99)
    for G, K in ((12, 1), (5, 3)):
        n = 300
        grids = rng.integers(0, G, size=n).astype(np.int32)
        errors = (rng.standard_t(3, size=(n,) + SHAPE) * rng.uniform(0.1, 5.0, size=(n, 1, 1, 1))).astype(np.float32)
        ref = RefBank(G, K, "bf16")
        for g, e in zip(grids, errors):
            ref.insert(int(g), e)
        assert all(len(x) == K for x in ref.lists)
        bank = jax.jit(insert_many)(init_bank(G, K, SHAPE), grids, errors)
        assert_same(bank, ref)


def test_grid_of_matches_official_scheduler():
    """Every official training timestep maps to the argmin-nearest official inference timestep."""
    torch = pytest.importorskip("torch")

    def official_timesteps(n, shift):  # FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)
        s = torch.linspace(1.0, 0.0, n + 1)[:-1]
        return shift * s / (1 + (shift - 1) * s) * 1000

    train_t = official_timesteps(1000, 5.0)
    grid_t = official_timesteps(50, 5.0)
    want = [int(torch.argmin((grid_t - max(0.0, min(t.item(), 999.0))).abs())) for t in train_t]
    got = np.asarray(grid_of(jnp.asarray(train_t.numpy())))
    assert got.dtype == np.int32 and got.shape == (1000,)
    np.testing.assert_array_equal(got, want)
    assert int(grid_of(1000.0)) == 0 and int(grid_of(0.0)) == 49
    assert len(set(want)) > 40


def _filled(counts, dtype=jnp.bfloat16):
    """A bank whose stored entries are constant arrays with distinct values 1, 2, 3, ... in insert order."""
    grids = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    values = np.arange(1.0, len(grids) + 1.0, dtype=np.float32)
    errors = np.broadcast_to(values[:, None, None, None], (len(grids),) + SHAPE)
    return jax.jit(insert_many)(init_bank(len(counts), max(counts) + 1, SHAPE, dtype), grids, errors)


def _chi2_uniform(values, support):
    values = np.round(np.asarray(values), 3)  # int8 dequantisation may be off by an ulp
    assert set(np.unique(values)) <= set(support)
    observed = np.array([np.sum(values == s) for s in support])
    return stats.chisquare(observed).pvalue


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_sample_uniform_over_grid_and_empty_flag(dtype):
    bank = _filled([3, 7, 0, 2], dtype)
    draws = 7000
    keys = jax.random.split(jax.random.key(0), draws)
    e, ok = jax.jit(jax.vmap(draw, in_axes=(None, 0, None)))(bank, keys, 1)
    assert bool(jnp.all(ok))
    vals = np.asarray(e)
    assert np.all(vals == vals[:, :1, :1, :1])  # whole entries, never mixed
    assert _chi2_uniform(vals[:, 0, 0, 0], np.arange(4.0, 11.0)) > 1e-3

    e, ok = jax.jit(draw)(bank, jax.random.key(1), 2)
    assert not bool(ok) and float(jnp.abs(e).max()) == 0.0 and e.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_sample_pooled_uniform_over_all_entries(dtype):
    bank = _filled([3, 0, 5, 1], dtype)
    draws = 9000
    keys = jax.random.split(jax.random.key(2), draws)
    e, ok = jax.jit(jax.vmap(draw_pooled, in_axes=(None, 0)))(bank, keys)
    assert bool(jnp.all(ok))
    assert _chi2_uniform(np.asarray(e)[:, 0, 0, 0], np.arange(1.0, 10.0)) > 1e-3

    e, ok = jax.jit(draw_pooled)(init_bank(4, 3, SHAPE), jax.random.key(3))
    assert not bool(ok) and float(jnp.abs(e).max()) == 0.0


def test_int8_storage_error_bound_and_memory():
    rng = np.random.default_rng(5)
    shape = (3, 8, 8, 16)
    bank = init_bank(2, 3, shape, jnp.int8)
    errors = np.stack([rng.normal(size=shape), rng.laplace(size=shape) * 4, rng.standard_t(2, size=shape)])
    errors = errors.astype(np.float32)
    bank = jax.jit(insert_many)(bank, jnp.zeros(3, jnp.int32), errors)
    stored = np.asarray(erft.decode(bank.errors[0], bank.scale[0]))
    scale = np.asarray(bank.scale[0])
    np.testing.assert_allclose(scale, np.abs(errors).reshape(3, -1).max(1) / 127, rtol=1e-6)
    err = np.abs(stored - errors)
    assert np.all(err <= scale[:, None, None, None, None] / 2 * (1 + 1e-5))
    # the stored int8 values are the rounded errors, and dequantise (computed here) to what decode returns
    s5 = scale[:, None, None, None, None].astype(np.float32)
    q = np.asarray(bank.errors[0])
    assert q.dtype == np.int8 and np.abs(q.astype(np.int32) - np.round(errors / s5)).max() <= 1
    assert np.mean(q == np.clip(np.round(errors / s5), -127, 127)) > 0.999 and np.abs(q).max() == 127
    np.testing.assert_array_equal(stored, q.astype(np.float32) * s5)
    # zero errors quantise to exact zeros (scale 0)
    zb = jax.jit(insert)(bank, 1, jnp.zeros(shape))
    assert float(zb.scale[1, 0]) == 0.0 and int(zb.count[1]) == 1

    for dtype in (jnp.bfloat16, jnp.int8, jnp.float32):
        b = init_bank(3, 5, shape, dtype)
        assert sum(x.nbytes for x in jax.tree.leaves(b)) == erft.bank_nbytes(3, 5, shape, dtype)
    bf16_bytes = init_bank(3, 5, shape).errors.nbytes
    assert init_bank(3, 5, shape, jnp.int8).errors.nbytes * 2 == bf16_bytes


def _compiled(fn, bank, *args):
    txt = jax.jit(fn, donate_argnums=0).lower(bank, *args).compile().as_text()
    assert "input_output_alias" in txt
    return txt


def _bank_sized(txt, dims, op, dtype=r"\w+"):
    """Instructions ``op`` whose result has the full bank shape ``dims``."""
    return re.findall(r"= " + dtype + r"\[" + ",".join(map(str, dims)) + r"\]\{[^}]*\} " + op + r"\(", txt)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8, jnp.float32])
def test_donated_insert_is_in_place(dtype):
    bank = init_bank(3, 4, (5, 6, 7, 8), dtype)
    dims = bank.errors.shape
    assert not _bank_sized(_compiled(insert, bank, 1, jnp.ones((5, 6, 7, 8))), dims, "copy")
    txt = _compiled(insert_many, bank, jnp.zeros(6, jnp.int32), jnp.ones((6, 5, 6, 7, 8)))
    assert not _bank_sized(txt, dims, "copy")
    # The write itself touches one entry: no bank-sized conversion (XLA:CPU upcasts bf16 updates otherwise).
    from svi_jax.erft.banks import _update_entry

    write = lambda errs, e, i: _update_entry(errs, e, i >= 0, (i, i, 0, 0, 0, 0))
    entry = jnp.ones((1, 1, 5, 6, 7, 8), bank.errors.dtype)
    txt = _compiled(write, bank.errors, entry, 1)
    assert not _bank_sized(txt, dims, "copy") and not _bank_sized(txt, dims, "convert")


def test_validation_errors():
    bank = init_bank(2, 2, SHAPE)
    with pytest.raises(ValueError, match="does not match the bank entry shape"):
        insert(bank, 0, jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="float type or int8"):
        init_bank(2, 2, SHAPE, jnp.int32)
    # grid indices are clipped into range rather than writing out of bounds
    b = insert(bank, 7, jnp.ones(SHAPE))
    assert np.asarray(b.count).tolist() == [0, 1]
