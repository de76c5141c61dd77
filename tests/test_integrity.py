"""Nothing silent: checksummed checkpoints and model dirs (named error, fallback), no checkpoint during a non-finite
streak, resume refuses changed settings, non-finite tensors and damaged files are named (issue 19)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from svi_jax import integrity
from svi_jax import train as train_lib
from svi_jax.model_dirs import CheckpointError, flatten


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from svi_jax.data import builder, synthetic

    d = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(str(d / "videos"), num_videos=4, num_frames=17, height=48, width=80, seed=3)
    builder.build_dataset(str(d / "videos"), str(d / "dataset"), progress=False)
    return str(d / "dataset")


def _config(dataset, **train):
    c = tiny.get_config()
    c.data.dataset = dataset
    c.train.update(async_checkpoints=False, export_lora=False, keep=5)
    c.train.update(train)
    return c


def _run(c, workdir):
    t = train_lib.Trainer(c, workdir)
    try:
        return t.run(progress=False), t
    finally:
        t.close()


def _biggest_file(d):
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path, n=64):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = bytearray(f.read(n))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_checksums_corruption_fallback_and_changed_settings(dataset, tmp_path, caplog):
    run = str(tmp_path / "run")
    _run(_config(dataset, num_steps=4, ckpt_every=2), run)
    ck = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(ck)) == ["2", "4"]
    for s in ("2", "4"):
        assert integrity.verify_checksums(os.path.join(ck, s), required=True)
    victim = _biggest_file(os.path.join(ck, "4", "state"))
    _flip(victim)
    with pytest.raises(integrity.IntegrityError, match=f"{victim} is corrupted"):
        integrity.verify_checksums(os.path.join(ck, "4"))
    # resume: step 4 is rejected (named, moved aside), the run goes on from step 2 and re-creates step 4
    caplog.set_level("WARNING", logger="svi_jax")
    summary, _ = _run(_config(dataset, num_steps=4, ckpt_every=2), run)
    assert summary["start_step"] == 2 and summary["end_step"] == 4
    assert "checkpoint step 4 does not verify" in caplog.text and "corrupted" in caplog.text
    assert "resuming from step 2, the newest checkpoint that verifies" in caplog.text
    assert os.listdir(os.path.join(run, "checkpoints_rejected")) == ["4"]
    assert integrity.verify_checksums(os.path.join(ck, "4"), required=True)
    # a deleted orbax metadata file: a named error, then the fallback again
    os.unlink(os.path.join(ck, "4", "state", "_METADATA"))
    caplog.clear()
    t = train_lib.Trainer(_config(dataset, num_steps=4, ckpt_every=2), run)
    assert t.restore() and int(t.state["step"]) == 2
    assert "_METADATA is missing" in caplog.text
    t.close()
    # changed settings are refused naming each field; allow_changes accepts them; config.json is never replaced
    original = open(os.path.join(run, "config.json")).read()
    c = _config(dataset, num_steps=6, ckpt_every=2, seed=7)
    c.optim.lr = 5e-4
    with pytest.raises(train_lib.ConfigError, match=r"optim\.lr was 0\.0002, now 0\.0005; train\.seed was 0, now 7.*"
                                                    r"--config\.train\.allow_changes=optim\.lr,train\.seed"):
        train_lib.Trainer(c, run)
    c.train.allow_changes = "optim.lr,train.seed"
    train_lib.Trainer(c, run).close()
    # an accepted LoRA shape change cannot restore: one error naming the keys (no advice to restore non-strictly)
    c = _config(dataset, num_steps=6, ckpt_every=2, allow_changes="lora,optim,train.seed")
    c.lora.update(rank=4, alpha=4)
    t = train_lib.Trainer(c, run)
    from svi_jax.train_checkpoints import CheckpointsUnusable

    with pytest.raises(CheckpointsUnusable, match=r"key 'lora/.*expected shape .*, got") as e:
        t.restore()
    assert "strict" not in str(e.value)
    t.close()
    assert open(os.path.join(run, "config.json")).read() == original
    assert json.load(open(os.path.join(run, "config.1.json")))["optim"]["lr"] == 5e-4


def test_nonfinite_streak_writes_no_checkpoint_and_a_sane_rerun_trains_on(dataset, tmp_path):
    run = str(tmp_path / "run")
    _run(_config(dataset, num_steps=2, ckpt_every=2), run)                     # a good checkpoint at step 2
    # lr 1e8: step 3 diverges (finite), step 4 is checkpointed, steps 5.. are NaN; keep=1
    c = _config(dataset, num_steps=12, ckpt_every=2, max_nonfinite=3, keep=1, allow_changes="optim.lr")
    c.optim.lr = 1e8
    t = train_lib.Trainer(c, run)
    with pytest.raises(FloatingPointError) as e:
        t.run(progress=False)
    t.close()
    msg = str(e.value)
    rows = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "step" in r]
    first_bad = min(r["step"] for r in rows if r["skipped"])
    saved = [int(s) for s in os.listdir(os.path.join(run, "checkpoints"))]
    rejected = [int(s) for s in os.listdir(os.path.join(run, "checkpoints_rejected"))]
    print("first non-finite step", first_bad, "kept", saved, "rejected", rejected)
    assert saved == [2]                               # keep=1 did not delete the pre-streak checkpoint
    assert all(first_bad - 1 <= s < first_bad for s in rejected)   # only the one that led into the streak
    assert "the last good state is the checkpoint of step 2" in msg and "none was written during" in msg
    good = 2
    # rerun at a sane lr: resumes from the pre-streak step and trains on with finite losses
    c = _config(dataset, num_steps=good + 2, ckpt_every=2, allow_changes="optim.lr")
    summary, t = _run(c, run)
    assert summary["start_step"] == good and summary["end_step"] == good + 2
    rows = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "step" in r]
    assert [r["step"] for r in rows][-2:] == [good + 1, good + 2]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in rows[-2:])


def _tiny_dit(tmp_path):
    from svi_jax.models.dit import DiT, DiTConfig, init_params

    cfg = DiTConfig(model_type="t2v", dim=24, num_layers=1, num_heads=2, ffn_dim=32, freq_dim=16, text_dim=16,
                    text_len=8, in_dim=4, out_dim=4)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    return DiT, cfg, params


def test_model_dir_corruption_and_nonfinite_are_named(tmp_path):
    import svi_jax

    DiT, cfg, params = _tiny_dit(tmp_path)
    d = str(tmp_path / "dit")
    DiT(cfg, params).save(d)
    assert integrity.verify_checksums(d, required=True)
    svi_jax.load(d)
    victim = _biggest_file(os.path.join(d, "params"))
    _flip(victim)
    with pytest.raises(CheckpointError, match=f"{victim} is corrupted.*convert the model again"):
        svi_jax.load(d)
    # non-finite values saved into a model directory: the key is named
    bad = jax.tree.map(np.array, params)
    flatten(bad)["blocks/self_attn/k/kernel"][0, 0, 0] = np.nan
    DiT(cfg, bad).save(str(tmp_path / "nan"))
    with pytest.raises(CheckpointError, match=r"key 'blocks/self_attn/k/kernel' holds 1 non-finite"):
        svi_jax.load(str(tmp_path / "nan"))


def test_lora_nonfinite_and_truncated_files_are_named(tmp_path):
    from svi_jax import lora as L

    DiT, cfg, params = _tiny_dit(tmp_path)
    lora = L.init_lora(params, jax.random.key(1), 2)
    path = L.save(lora, str(tmp_path / "lora.safetensors"))
    L.load(path, params)
    sd = L.to_state_dict(jax.tree.map(lambda a: np.full(a.shape, np.nan, np.float32), lora))
    from safetensors.numpy import save_file

    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(L.LoRAError, match=r"nan\.safetensors: key '.*lora_[AB].*' holds \d+ non-finite"):
        L.load(str(tmp_path / "nan.safetensors"), params)
    raw = open(path, "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(raw[: len(raw) - 100])
    with pytest.raises(L.LoRAError, match=r"cut\.safetensors is damaged or not a safetensors file"):
        L.load(str(tmp_path / "cut.safetensors"), params)


def test_converter_names_truncated_nonfinite_and_unsafe_sources(tmp_path):
    import torch
    from safetensors.numpy import save_file

    from svi_jax.convert.common import ConversionError, TensorSource

    save_file({"a": np.ones((96, 96), np.float32), "b": np.ones(4, np.float32)}, str(tmp_path / "w.safetensors"))
    raw = open(tmp_path / "w.safetensors", "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(raw[:-2000])
    src = TensorSource(str(tmp_path / "cut.safetensors"))
    with pytest.raises(ConversionError, match=r"cut\.safetensors: tensor 'a' \(96, 96\) needs 36864 bytes .* truncated"):
        src.get("a")
    save_file({"w": np.array([1.0, np.inf], np.float32)}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor 'w' holds 1 non-finite"):
        TensorSource(str(tmp_path / "inf.safetensors")).get("w")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.ones(2), "x": Evil()}, str(tmp_path / "evil.pth"))
    with pytest.raises(ConversionError) as e:
        TensorSource(str(tmp_path / "evil.pth"))
    assert "evil.pth cannot be read as a plain tensor file" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "pickled objects" in str(e.value)
    torch.save({"w": torch.ones(2)}, str(tmp_path / "legacy.pth"), _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="legacy.pth cannot be read as a plain tensor file") as e:
        TensorSource(str(tmp_path / "legacy.pth"))
    assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("field,value,expect", [
    ("data.batch_size", 0, "config.data.batch_size: must be >= 1, got 0"),
    ("lora.targets", "no_such_module", "the LoRA target regex 'no_such_module' matches no kernel of the model"),
    ("mesh.data", 3, "devices, but"),
])
def test_bad_training_settings_give_one_line_and_exit_2(dataset, tmp_path, capsys, field, value, expect):
    from svi_jax import cli

    c = _config(dataset)
    if field == "mesh.data":
        value = jax.device_count() + 2
    section, key = field.split(".")
    c[section][key] = value
    assert cli.guard(lambda: train_lib.Trainer(c, str(tmp_path / "w"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
