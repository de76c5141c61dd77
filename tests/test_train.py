"""The trainer on the tiny config: steps, LoRA-only updates, banks through checkpoints, exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from svi_jax import train as train_lib
from svi_jax.model_dirs import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A built synthetic dataset shared by every test here (the tiny default builds its own the same way)."""
    from svi_jax.data import builder, synthetic

    d = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(str(d / "videos"), num_videos=6, num_frames=17, height=48, width=80, seed=3)
    builder.build_dataset(str(d / "videos"), str(d / "dataset"), progress=False)
    return str(d / "dataset")


def _config(dataset, **train):
    c = tiny.get_config()
    c.data.dataset = dataset
    c.train.update(train)
    c.train.async_checkpoints = False
    return c


def test_steps_update_lora_only_and_fill_banks(dataset, tmp_path):
    c = _config(dataset, num_steps=4, ckpt_every=2)
    c.lora.update(rank=4, alpha=12)   # alpha != rank: training scales the LoRA by 3, the export must too
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    base_before = jax.tree.map(np.array, t.state["params"])
    lora_before = jax.tree.map(np.array, t.state["lora"])
    summary = t.run(progress=False)
    t.close()
    assert summary["end_step"] == 4 and os.path.isfile(summary["lora_file"])
    assert t.step_fn.jitted.jitted._cache_size() == 1                # 4 steps, one compiled step (no recompiles)
    # the frozen params are untouched bit for bit, the LoRA moved
    for k, v in flatten(base_before).items():
        np.testing.assert_array_equal(np.asarray(flatten(t.state["params"])[k]), v)
    moved = [not np.array_equal(np.asarray(flatten(t.state["lora"])[k]), v) for k, v in flatten(lora_before).items()]
    assert any(moved)
    assert int(jnp.sum(t.state["banks"]["noise"].count)) > 0 and int(jnp.sum(t.state["banks"]["latent"].count)) > 0
    header, *rows = map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
    assert header["header"]["attention"] == "per_head" and header["header"]["platform"] == "cpu"  # what auto ran as
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "bank_fill_noise", "bank_fill_latent", "rate_latent_injected",
                "steps_per_s"):
        assert key in rows[-1]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["grad_norm"] > 0
    assert os.listdir(tmp_path / "run" / "tb")
    _check_export_is_the_trained_model(t, summary["lora_file"], tmp_path)


def _check_export_is_the_trained_model(t, lora_file, tmp_path):
    """The exported LoRA (alpha != rank) is the trained model: through ``svi_jax.load(base, lora=file)`` and through
    the official inference merge ``W += 1.0 * B @ A`` done in torch on the ``dit-to-torch`` export of the base (read
    back by our converter: diffusers hard-codes 512 text tokens, the tiny base has 48)."""
    from safetensors.torch import load_file, save_file

    import svi_jax
    from svi_jax.convert.dit import convert, export_official
    from tests.torch_ref import max_rel_err

    base_dir = t.config.checkpoints.dit
    cfg = t.module.cfg
    assert cfg.lora_scale == 3.0
    r = np.random.RandomState(0)
    x = r.randn(1, 2, 4, 4, cfg.out_dim).astype(np.float32)
    y = r.randn(1, 2, 4, 4, cfg.in_dim - cfg.out_dim).astype(np.float32)
    ctx = r.randn(1, cfg.text_len, cfg.text_dim).astype(np.float32)
    clip = r.randn(1, 257, cfg.image_dim).astype(np.float32)
    ts = np.array([431.0], np.float32)
    trained = np.asarray(t.module.apply({"params": t.state["params"]["dit"], "lora": t.state["lora"]}, x, ts, ctx,
                                        clip_fea=clip, y=y))
    base = np.asarray(t.module.apply({"params": t.state["params"]["dit"]}, x, ts, ctx, clip_fea=clip, y=y))
    assert max_rel_err(base, trained) > 1e-4                        # the LoRA changes the model
    ours = np.asarray(svi_jax.load(base_dir, lora=lora_file)(x, ts, ctx, clip_fea=clip, y=y))
    assert max_rel_err(ours, trained) < 1e-5, max_rel_err(ours, trained)
    off_file = str(tmp_path / "official" / "model.safetensors")
    export_official(base_dir, off_file)
    sd = load_file(off_file)
    lsd = load_file(lora_file)
    for k in lsd:
        if ".lora_A." in k:
            name = k.split(".lora_A.")[0]
            sd[name + ".weight"] += 1.0 * (lsd[k.replace(".lora_A.", ".lora_B.")] @ lsd[k])
    save_file(sd, off_file)
    convert(os.path.dirname(off_file), str(tmp_path / "merged"), show_progress=False)
    merged = np.asarray(svi_jax.load(str(tmp_path / "merged"))(x, ts, ctx, clip_fea=clip, y=y))
    err = max_rel_err(merged, trained)
    print(f"trained LoRA (alpha/rank = 3) vs the official torch merge of its export: max rel err {err:.2e}")
    assert err < 1e-5


def test_banks_survive_save_restore(dataset, tmp_path):
    c = _config(dataset, num_steps=3, ckpt_every=3)
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    t.run(progress=False)
    banks = jax.tree.map(np.array, t.state["banks"])
    t.close()
    t2 = train_lib.Trainer(c, str(tmp_path / "run"))
    assert int(jnp.sum(t2.state["banks"]["latent"].count)) == 0      # fresh before restore
    assert t2.restore()
    for a, b in zip(jax.tree.leaves(banks), jax.tree.leaves(t2.state["banks"])):
        np.testing.assert_array_equal(np.asarray(b), a)
    assert int(t2.state["step"]) == 3
    t2.close()


def test_loss_decreases_on_a_fixed_batch(dataset, tmp_path):
    c = _config(dataset, num_steps=1)
    c.erft.enabled = False
    c.optim.lr = 1e-2    # the shipped base's fixed-batch loss falls steadily at 1e-2 (at 2e-2: 23 of 29 steps down)
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    batch = t.conditioner.device_batch(next(t.data))
    key_data = np.asarray(jax.random.key_data(t.state["rng"]))
    losses = []
    state = t.state
    for _ in range(30):
        # same timestep and noise every step (a fresh buffer each time: the step donates its state)
        state = state.replace(rng=jax.random.wrap_key_data(jnp.asarray(key_data)))
        state, m = t.step_fn(state, batch)
        losses.append(float(m["loss"]))
    t.close()
    print("fixed-batch losses", [round(v, 4) for v in losses[::6]])
    assert losses[-1] < 0.9 * losses[0]
    assert sum(b <= a for a, b in zip(losses, losses[1:])) >= 0.8 * (len(losses) - 1)   # mostly monotone


def test_nonfinite_updates_are_skipped_and_stop_the_run(dataset, tmp_path):
    c = _config(dataset, num_steps=10, max_nonfinite=3)
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    # poison the frozen DiT: every loss is NaN
    t.state["params"]["dit"]["head"]["head"]["kernel"] = t.state["params"]["dit"]["head"]["head"]["kernel"] * np.nan
    lora_before = jax.tree.map(np.array, t.state["lora"])
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row .* at step 3;"):
        t.run(progress=False)
    for k, v in flatten(lora_before).items():
        np.testing.assert_array_equal(np.asarray(flatten(t.state["lora"])[k]), v)
    # metrics are read one step late: step 3's arrive after step 4 was dispatched (and skipped too)
    assert int(t.state["nonfinite_total"]) == 4
    t.close()


def test_bad_config_value_is_rejected(dataset):
    c = _config(dataset)
    c.erft.p_clean = 1.5
    with pytest.raises(train_lib.ConfigError, match=r"config\.erft\.p_clean: is a probability, got 1\.5"):
        train_lib.validate_config(c)
    c = _config(dataset)
    c.data.num_frames = 18
    with pytest.raises(train_lib.ConfigError, match=r"num_frames must be 1 \+ 4k"):
        train_lib.latent_shape(c)


def test_cosine_schedule_decays_to_zero(dataset):
    c = _config(dataset)
    c.train.num_steps, c.optim.grad_clip, c.optim.weight_decay = 10, 1e9, 0.0
    sizes = {}
    for schedule in ("constant", "cosine"):
        c.optim.schedule = schedule
        opt = train_lib.make_optimizer(c)
        p, g = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
        st, steps = opt.init(p), []
        for _ in range(10):
            u, st = opt.update(g, st, p)
            steps.append(float(jnp.abs(u["w"]).max()))
        sizes[schedule] = steps
    np.testing.assert_allclose(sizes["constant"], c.optim.lr, rtol=1e-3)   # Adam's first steps are ~lr
    np.testing.assert_allclose(sizes["cosine"][0], c.optim.lr, rtol=1e-3)
    assert sizes["cosine"][-1] < 0.03 * c.optim.lr and np.all(np.diff(sizes["cosine"]) < 0)
    c.optim.schedule = "linear"
    with pytest.raises(train_lib.ConfigError, match="optim.schedule"):
        train_lib.make_optimizer(c)


def _cli(workdir, dataset, *extra):
    return [sys.executable, "-m", "svi_jax.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--workdir", workdir, f"--config.data.dataset={dataset}", "--config.train.num_steps=6",
            "--config.train.ckpt_every=2", *extra]


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "step" in r]


def test_cli_sigkill_and_resume_is_exact(dataset, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    r = subprocess.run(_cli(ref_dir, dataset), env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses(ref_dir)
    assert [s for s, _ in ref] == list(range(1, 7))
    # kill -9 mid-run, at a known point: tests/train_pause.py stops the run right after step 4's checkpoint is
    # complete (of 6 steps), then re-run the same command
    marker = str(tmp_path / "paused")
    cmd = _cli(run_dir, dataset)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "train_pause.py"), "4", marker] + cmd[3:],
                         env=env, stdout=subprocess.DEVNULL, stderr=open(marker + ".log", "w"), cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert p.poll() is None, open(marker + ".log").read()[-3000:]
            assert time.time() < deadline, "the run never reached step 4"
            time.sleep(0.1)
        assert not os.path.exists(os.path.join(run_dir, "lora.safetensors"))   # stopped mid-run
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = subprocess.run(_cli(run_dir, dataset), env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4" in r.stderr
    assert _losses(run_dir) == ref
    from safetensors.numpy import load_file

    # the same LoRA file, every tensor bit for bit (the header's metadata order is not deterministic)
    got, want = (load_file(os.path.join(d, "lora.safetensors")) for d in (run_dir, ref_dir))
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def test_cli_rejects_bad_override(dataset, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(_cli(str(tmp_path / "x"), dataset, "--config.optim.lr=-1"), env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "config.optim.lr: must be > 0" in r.stderr
    r = subprocess.run(_cli(str(tmp_path / "x"), dataset, "--config.optim.lrr=1"), env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0 and "lrr" in r.stderr


def test_checkpoint_is_everything_but_the_frozen_part():
    """The typed state saves the tree the trainer has always written (old run directories resume unchanged):
    ``{lora | dit, opt, banks, rng, step, nonfinite_run, nonfinite_total}``; the frozen params never."""
    from svi_jax.models.dit import DiTConfig, param_shapes

    for trainable, erft in (("lora", True), ("full", False)):
        c = tiny.get_config()
        c.train.trainable, c.erft.enabled = trainable, erft
        params = {"dit": param_shapes(DiTConfig.from_dict(c.model.to_dict()))}
        state = jax.eval_shape(lambda p, k: train_lib.init_state(c, p, k), params, jax.random.key(0))
        saved = state.checkpoint()
        want = {"rng", "step", "nonfinite_run", "nonfinite_total", "opt"} | ({"lora", "banks"} if erft else {"dit"})
        assert set(saved) == want and state.full == (trainable == "full")
        assert "dit" in state.params and ("dit" in state.frozen) == (trainable == "lora")
        back = state.with_checkpoint(saved)
        assert jax.tree.structure(back) == jax.tree.structure(state)
        assert ("lora" in state) == (trainable == "lora") and ("banks" in state) == erft


def test_encoders_run_as_their_own_program_with_the_single_programs_numbers(dataset, tmp_path):
    """Pixel batches: the trainer runs the frozen encoders as their own program, then the DiT step on their outputs
    (so the two never hold temporaries at once). With the same key for the encoders' random draws, that gives the
    single fused program's loss, LoRA update, banks and next key."""
    c = _config(dataset, num_steps=1)
    c.baseline = {"handcrafted_p": 1.0}   # the encoders' prepare draws random numbers too (Tab. 7 degradations)
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    batch = t.device_batch(next(t.data))
    assert t.step_fn.encoder is not None and "video" not in t.step_fn.abstract_inputs
    fused = jax.jit(train_lib.make_train_step(c, t.conditioner.prepare)[0])   # encoders inside, not donated
    s_one, m_one = fused(t.state, batch)
    s_two, m_two = t.step_fn(t.state, batch)
    t.close()
    np.testing.assert_allclose(float(m_two["loss"]), float(m_one["loss"]), rtol=1e-5)
    np.testing.assert_array_equal(jax.random.key_data(s_two.rng), jax.random.key_data(s_one.rng))
    # LoRA in float32 to 1e-4; the bf16 banks to one bf16 rounding step (the two programs fuse differently)
    for name, rtol in (("lora", 1e-4), ("banks", 2 ** -7)):
        one, two = (flatten(jax.tree.map(np.asarray, s[name])) for s in (s_one, s_two))
        assert one.keys() == two.keys()
        for k, v in one.items():
            np.testing.assert_allclose(np.asarray(two[k], np.float32), np.asarray(v, np.float32), rtol=rtol,
                                       atol=1e-6, err_msg=f"{name} {k}")
