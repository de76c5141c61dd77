"""SVI-Talk training: talking-head videos with audio -> audio features at build time -> LoRA steps with the audio
windows in the DiT (audio layers frozen), bad/silent files skipped and counted."""
from __future__ import annotations

import json
import os
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import talk_tiny
from svi_jax import talk
from svi_jax.model_dirs import flatten


def _wav(path, seconds, amp=0.3, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    pcm = (amp * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from svi_jax.data.video import write_video

    d = tmp_path_factory.mktemp("talk_videos")
    vids = d / "videos"
    vids.mkdir()
    r = np.random.RandomState(0)
    for i, (amp, with_audio) in enumerate([(0.3, True), (0.2, True), (0.0, True), (0.3, False)]):
        frames = (r.rand(30, 48, 64, 3) * 255).astype(np.uint8)
        path = str(vids / f"v{i}.mp4")
        write_video(path, frames, fps=25.0)
        if with_audio:
            _wav(d / f"a{i}.wav", 1.2, amp)
            talk.mux_audio(path, str(d / f"a{i}.wav"))
    (vids / "broken.mp4").write_bytes(b"not a video")
    return str(vids)


def test_talk_dataset_build_and_train_steps(videos, tmp_path):
    from svi_jax import train as train_lib

    c = talk_tiny.get_config()
    c.data.videos = videos
    c.train.update(num_steps=2, ckpt_every=2, async_checkpoints=False)
    t = train_lib.Trainer(c, str(tmp_path / "run"))
    summary = json.load(open(tmp_path / "run" / "talk_dataset" / "summary.json"))   # the project's TFDS build
    assert summary["kept"] == 2 and summary["skipped"]["silent"] == 1 and summary["skipped"]["no_audio"] == 1
    assert summary["skipped_total"] == 3 and os.path.isfile(os.path.join(summary["dataset_dir"], "dataset_info.json"))
    from svi_jax.data.builder import npy_from_bytes, open_dataset

    rec = open_dataset(summary["dataset_dir"])[0]          # the stored features are the sampler's for that file
    key = rec["key"].decode() if isinstance(rec["key"], bytes) else str(rec["key"])
    np.testing.assert_allclose(npy_from_bytes(rec["audio"]), talk.audio_features(c, os.path.join(videos, key)),
                               rtol=1e-5, atol=1e-6)
    batch = t.data.peek()
    assert batch["audio_first"].shape == (1, 1, 5, 2, 16) and batch["audio_later"].shape == (1, 4, 8, 2, 16)
    base_before = jax.tree.map(np.array, t.state["params"]["dit"])
    lora_before = jax.tree.map(np.array, t.state["lora"])
    assert not any("audio" in k or "norm_x" in k for k in flatten(t.state["lora"]))     # audio layers: no LoRA
    out = t.run(progress=False)
    t.close()
    assert out["end_step"] == 2
    for k, v in flatten(base_before).items():                   # audio layers frozen with the base
        np.testing.assert_array_equal(np.asarray(flatten(t.state["params"]["dit"])[k]), v)
    assert any(not np.array_equal(np.asarray(flatten(t.state["lora"])[k]), v) for k, v in flatten(lora_before).items())
    rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "step" in r]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_audio_reaches_the_loss_and_drop_audio():
    """The audio windows change the model output, and drop_audio zeroes whole examples with probability p."""
    from svi_jax.talk_data import drop_audio

    a = (jnp.ones((4000, 1, 5, 2, 3)), jnp.ones((4000, 4, 8, 2, 3)))
    d = drop_audio(jax.random.key(0), a, 0.1)
    dropped = np.asarray(jnp.all(d[0] == 0, axis=(1, 2, 3, 4)))
    np.testing.assert_array_equal(dropped, np.asarray(jnp.all(d[1] == 0, axis=(1, 2, 3, 4))))
    assert 0.08 < dropped.mean() < 0.12
    assert np.all(np.asarray(d[0])[~dropped] == 1)


def test_talk_config_refuses_a_dataset_without_audio(tmp_path):
    """A Shot/Film dataset (no audio field) given to a Talk config is one clear error, not a KeyError later."""
    from svi_jax.data import builder, scroll
    from svi_jax.talk_data import make_talk_data

    scroll.write_dataset(str(tmp_path / "v"), num_videos=2, num_frames=17, height=32, width=48)
    builder.build_dataset(str(tmp_path / "v"), str(tmp_path / "ds"), progress=False)
    c = talk_tiny.get_config()
    c.data.dataset = str(tmp_path / "ds")
    with pytest.raises(ValueError, match="has no audio features"):
        make_talk_data(c, str(tmp_path / "run"))
