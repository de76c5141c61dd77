"""SVI-Dance training: pose frames stored with the clip in the dataset, the official condition dropout, and a tiny
train run that updates both the LoRA and the pose embedding (initialised from a UniAnimate-style adapter) and
exports the SVI-Dance file."""
from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svi_jax import dance_train
from svi_jax import train as train_lib
from svi_jax.model_dirs import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dance_tiny_cfg", os.path.join(ROOT, "configs", "dance_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.train.async_checkpoints = False
    return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic clips, each with a clip.pose.mp4 beside it (a moving bright square), built into a dataset."""
    from svi_jax.data import builder, synthetic
    from svi_jax.data.scan import pose_path
    from svi_jax.data.video import write_video

    d = tmp_path_factory.mktemp("dance_data")
    synthetic.write_dataset(str(d / "videos"), num_videos=2, num_frames=13, height=32, width=48, seed=3)
    for i, v in enumerate(sorted(glob.glob(str(d / "videos" / "*" / "*.mp4")))):
        frames = np.zeros((13, 32, 48, 3), np.uint8)
        for t in range(13):
            frames[t, 8:16, 2 + 3 * t:10 + 3 * t] = (255, 128 * i, 0)
        write_video(pose_path(v), frames, fps=16.0, crf=0)
    builder.build_dataset(str(d / "videos"), str(d / "dataset"), progress=False)
    return str(d / "dataset")


def test_pose_frames_are_stored_with_the_clip(dataset):
    from svi_jax.data.builder import open_dataset
    from svi_jax.data.loader import ClipLoader

    src = open_dataset(dataset)
    assert len(src) == 2                                        # the .pose.mp4 files are not clips themselves
    c = _config()
    batch = next(iter(ClipLoader(dataset, c.data)))
    assert batch["pose"].shape == (1, 9, 32, 48, 3) and batch["pose"].dtype == np.float32
    assert batch["pose"].max() > 200 and batch["pose"].min() == 0   # 0..255 pixels, the square is there


def test_condition_dropout_rates():
    c = _config()
    n = 20000
    inputs = {"x0": jnp.zeros((n, 1, 1, 1, 1)), "y": jnp.ones((n, 1, 1, 1, 2)), "clip_fea": jnp.ones((n, 3, 2)),
              "pose": jnp.ones((n, 1, 16, 16, 3))}
    extra, y, clip, y_null = dance_train.condition(c, inputs, jax.random.key(0))
    keep = np.asarray(extra["pose_keep"])
    assert abs((1 - keep.mean()) - 0.145) < 0.01                   # 1 - 0.95 * 0.9
    yn = np.asarray(y_null)
    assert abs(yn.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(np.asarray(y)[:, 0, 0, 0, 0] == 0, yn)            # y and CLIP zeroed together
    np.testing.assert_array_equal(np.asarray(clip)[:, 0, 0] == 0, yn)
    assert abs(np.corrcoef(keep, yn)[0, 1]) < 0.03                 # independent draws
    with pytest.raises(ValueError, match="no pose frames"):
        dance_train.condition(c, {k: v for k, v in inputs.items() if k != "pose"}, jax.random.key(0))


def _scaled_b(lora, s):
    """A LoRA tree with every up-projection ``b`` times ``s`` (written here, not dance_train.fold_scale)."""
    return {k: ({"a": np.asarray(v["a"]), "b": np.asarray(v["b"]) * s} if set(v) == {"a", "b"} else _scaled_b(v, s))
            for k, v in lora.items()}


def test_tiny_dance_training_trains_lora_and_pose(dataset, tmp_path):
    from svi_jax.convert.dance import export_file, load_adapter
    from svi_jax import lora as lora_lib

    c = _config()
    c.data.dataset = dataset
    c.lora.update(rank=4, alpha=8)   # alpha != rank: training scales the LoRA by 2; import and export must undo it
    # a UniAnimate-style adapter to start from (random LoRA + pose module, official file layout)
    base = train_lib.load_frozen_params(c, jax.random.key(0))
    lora0 = jax.tree.map(lambda a: a + 0.01, lora_lib.init_lora(base, jax.random.key(1), c.lora.rank))
    pose0 = jax.tree.map(lambda a: a * 2.0 + 0.02, base["dwpose_embedding"])
    export_file(lora0, pose0, str(tmp_path / "unianimate.ckpt"))
    c.dance.adapter = str(tmp_path / "unianimate.ckpt")
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    start = jax.tree.map(np.array, t.state["lora"])
    # initialised from the adapter: the pose module as it is, B / (alpha / rank) so that x W + 2 (x A) B is the
    # adapter's model W + B @ A
    for got, want in ((start["dwpose_embedding"], pose0), ({k: v for k, v in start.items() if k != "dwpose_embedding"},
                                                           _scaled_b(lora0, 0.5))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6)
    frozen = jax.tree.map(np.array, t.state["params"]["dit"])
    summary = t.run(num_steps=3, progress=False)
    t.close()
    assert summary["end_step"] == 3
    end = jax.tree.map(np.array, t.state["lora"])
    fs, fe = flatten(start), flatten(end)
    changed = {k for k in fs if not np.array_equal(fs[k], fe[k])}
    assert any(k.startswith("dwpose_embedding/") for k in changed), "the pose embedding was not trained"
    assert any(k.startswith("blocks/") for k in changed), "the LoRA was not trained"
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(t.state["params"]["dit"])):
        np.testing.assert_array_equal(a, np.asarray(b))             # the base stays frozen
    lora, pose, info = load_adapter(summary["lora_file"])          # the SVI-Dance export reads back
    for a, b in zip(jax.tree.leaves(pose), jax.tree.leaves(end["dwpose_embedding"])):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)
    trained = _scaled_b({k: v for k, v in end.items() if k != "dwpose_embedding"}, 2.0)   # B * alpha / rank
    assert set(flatten(lora)) == set(flatten(trained))
    for k, v in flatten(trained).items():
        np.testing.assert_allclose(np.asarray(flatten(lora)[k]), v, rtol=1e-6)
    assert info["rank"] == c.lora.rank
