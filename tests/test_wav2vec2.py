"""wav2vec2 features (SVI-Talk) vs transformers ``Wav2Vec2Model`` run as the official
``utils/src/audio_analysis/wav2vec2.py`` (feature extractor -> linear interpolation -> feature projection -> encoder
-> hidden_states[1:]), tiny random configs loaded through our converter."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import svi_jax  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.models import wav2vec2 as w2v  # noqa: E402
from tests.torch_ref import from_torch_cli, max_rel_err, randomize_  # noqa: E402

TOL = 1e-4


def _tiny(seed=0, **kw):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    c = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8, 8),
             conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embeddings=8,
             num_conv_pos_embedding_groups=4)
    c.update(kw)
    torch.manual_seed(seed)
    return randomize_(Wav2Vec2Model(Wav2Vec2Config(**c)).eval(), seed)


def _official_features(m, wav, seq_len):
    """Official Wav2Vec2Model.forward(input_values, seq_len, output_hidden_states=True).hidden_states[1:] stacked
    as get_embedding does. transformers 5 collects encoder hidden states with hooks on the top-level model, so the
    encoder stack is walked here: hidden_states[0] is the input of layer 0, hidden_states[i + 1] layer i's output
    (checked against the full model in test_layer_outputs_are_hidden_states)."""
    with torch.no_grad():
        f = m.feature_extractor(torch.from_numpy(wav)[None]).transpose(1, 2)
        f = F.interpolate(f.transpose(1, 2), size=seq_len, align_corners=True, mode="linear").transpose(1, 2)
        h, _ = m.feature_projection(f)
        return _encoder_layer_outputs(m, h)


def _encoder_layer_outputs(m, h):
    enc = m.encoder
    h = h + enc.pos_conv_embed(h)
    h = enc.layer_norm(h)
    outs = []
    for layer in enc.layers:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
        outs.append(h)
    return torch.stack(outs, dim=1).squeeze(0).permute(1, 0, 2).numpy()   # [T, layers, hidden]


def test_layer_outputs_are_hidden_states():
    m = _tiny(seed=3)
    x = torch.from_numpy(np.random.RandomState(0).randn(1, 3000).astype(np.float32))
    with torch.no_grad():
        full = m(x, output_hidden_states=True).hidden_states
        f = m.feature_extractor(x).transpose(1, 2)
        h, _ = m.feature_projection(f)
        ours = _encoder_layer_outputs(m, h)
    ref = torch.stack(full[1:], dim=1).squeeze(0).permute(1, 0, 2).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def _save(m, d, do_normalize=True):
    m.save_pretrained(d, safe_serialization=True)
    json.dump({"do_normalize": do_normalize, "feature_size": 1, "sampling_rate": 16000},
              open(os.path.join(d, "preprocessor_config.json"), "w"))


@pytest.mark.parametrize("variant", [dict(), dict(feat_extract_norm="layer", conv_bias=True)])
def test_features_match_official(tmp_path, variant):
    m = _tiny(seed=1, **variant)
    _save(m, str(tmp_path / "hf"))
    assert from_torch_cli("wav2vec2", "--src", tmp_path / "hf", "--dst", tmp_path / "ours") == 0
    enc = svi_jax.load(str(tmp_path / "ours"))
    r = np.random.RandomState(2)
    for n_samples in (4321, 6399):      # odd lengths: 50 Hz features interpolated to int(dur * 25) steps
        wav = (0.1 * r.randn(n_samples)).astype(np.float32)
        seq = w2v.num_steps(n_samples)
        ref = _official_features(m, wav, seq)
        out = np.asarray(enc(wav[None], seq))[0]
        err = max_rel_err(out, ref)
        print(f"wav2vec2 {variant or 'group'} {n_samples} samples -> {seq} steps: max rel err {err:.2e}")
        assert out.shape == (seq, 2, 16) and err <= TOL


def test_features_pipeline_host_side(tmp_path):
    """features(): loudness norm to -23 LUFS (pyloudnorm) + the feature extractor's input normalisation."""
    import pyloudnorm as pyln
    from transformers import Wav2Vec2FeatureExtractor

    m = _tiny(seed=4)
    _save(m, str(tmp_path / "hf"))
    from svi_jax.convert.wav2vec2 import convert

    convert(str(tmp_path / "hf"), str(tmp_path / "ours"))
    enc = svi_jax.load(str(tmp_path / "ours"))
    t = np.arange(16000 * 2) / 16000
    wav = (0.05 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    # official audio_process.loudness_norm + Wav2Vec2FeatureExtractor(do_normalize=True)
    meter = pyln.Meter(16000)
    normed = pyln.normalize.loudness(wav, meter.integrated_loudness(wav), -23)
    assert abs(meter.integrated_loudness(w2v.loudness_norm(wav)) + 23) < 0.01
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    iv = np.squeeze(fe(normed, sampling_rate=16000).input_values).astype(np.float32)
    ref = _official_features(m, iv, 50)
    out = enc.features(wav)
    assert out.shape == (50, 2, 16)
    assert max_rel_err(out, ref) <= TOL
    # silence measures -inf LUFS: left unchanged (official), not a NaN
    assert np.isfinite(enc.features(np.zeros(8000, np.float32))).all()


def test_read_audio_roundtrip(tmp_path):
    import wave

    sr = 16000
    pcm = (np.sin(np.arange(sr // 2) / 7.0) * 12000).astype(np.int16)
    with wave.open(str(tmp_path / "a.wav"), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(np.stack([pcm, pcm], -1).tobytes())
    out = w2v.read_audio(str(tmp_path / "a.wav"))
    assert out.shape == (sr // 2,)
    np.testing.assert_allclose(out, pcm / 32768.0, atol=2e-4)
    with pytest.raises(FileNotFoundError):
        w2v.read_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="cannot read audio"):
        w2v.read_audio(str(tmp_path / "bad.wav"))


def test_bad_wav2vec2_checkpoints_fail_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _tiny(seed=5)
    _save(m, str(tmp_path / "hf"))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd.pop("encoder.layers.1.final_layer_norm.weight")
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.final_layer_norm\.weight"):
        from svi_jax.convert.wav2vec2 import convert

        convert(str(tmp_path / "hf"), str(tmp_path / "o"))
    sd["encoder.layers.1.final_layer_norm.weight"] = torch.ones(17)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    assert from_torch_cli("wav2vec2", "--src", tmp_path / "hf", "--dst", tmp_path / "o") == 2
    os.remove(tmp_path / "hf" / "config.json")
    with pytest.raises(ConversionError, match="config.json"):
        convert(str(tmp_path / "hf"), str(tmp_path / "o"))
