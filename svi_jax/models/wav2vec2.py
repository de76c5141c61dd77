"""wav2vec2 audio features for SVI-Talk (transformers ``Wav2Vec2Model`` layout, e.g.
``TencentGameMate/chinese-wav2vec2-base``), run as the official ``utils/src/audio_analysis/wav2vec2.py`` and
``utils/audio_process.py``:

16 kHz mono waveform -> ITU-R BS.1770 loudness normalisation to -23 LUFS (pyloudnorm; skipped when the measured
loudness is beyond +-100, e.g. silence) -> the feature extractor's zero-mean/unit-variance normalisation
(``do_normalize``) -> CNN feature extractor -> features linearly interpolated (``align_corners=True``) to
``int(num_samples / 16000 * 25)`` steps *before* ``feature_projection`` -> encoder -> ``hidden_states[1:]``
(the output of every encoder layer) stacked to ``[T25, num_layers, hidden]``.

Parameter paths follow the transformers names with ``/`` for ``.`` (Linear/Conv kernels transposed to
``[in, out]`` / ``[k, in/groups, out]``; the positional convolution's weight norm folded into one kernel).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from svi_jax.models.layers import attention, dtype_of

KIND = "wav2vec2"
SAMPLE_RATE = 16000
FPS = 25
TARGET_LUFS = -23.0


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: Sequence[int] = (512,) * 7
    conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"   # 'group' (first conv layer only) | 'layer' (every conv layer)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False  # pre-LN layers (wav2vec2-large-lv60 style)
    do_normalize: bool = True           # Wav2Vec2FeatureExtractor zero-mean/unit-variance input normalisation
    param_dtype: str = "float32"
    dtype: str = "float32"
    attn_impl: str = "auto"

    @classmethod
    def from_dict(cls, d) -> "Wav2Vec2Config":
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown wav2vec2 config keys {unknown}; known: {sorted(fields)}")
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        cfg = cls(**d)
        if cfg.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {cfg.feat_extract_norm!r}")
        if not len(cfg.conv_dim) == len(cfg.conv_kernel) == len(cfg.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            d[k] = list(d[k])
        return d


def _norm(x, scale, bias, eps, axes):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class _Norm(nn.Module):
    """LayerNorm over channels (``axes=-1``) or GroupNorm with one channel per group (``axes=1``: over time)."""

    eps: float
    axes: int = -1

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (d,))
        return _norm(x, scale, bias, self.eps, self.axes)


class _Dense(nn.Module):
    features: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                       (x.shape[-1], self.features))
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)), (self.features,))
        dt = dtype_of(self.dtype)
        return x.astype(dt) @ k.astype(dt) + b.astype(dt)


class _Conv1d(nn.Module):
    """``[B, T, C]`` channels-last Conv1d (kernel ``[k, C/groups, out]``), no padding unless given."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None)),
                       (self.kernel, c // self.groups, self.features))
        dt = dtype_of(self.dtype)
        y = jax.lax.conv_general_dilated(x.astype(dt), k.astype(dt), (self.stride,), [(self.padding,) * 2],
                                         dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups,
                                         precision=jax.lax.Precision.HIGHEST)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(dt)
        return y


class FeatureExtractor(nn.Module):
    """``conv_layers.i.{conv, layer_norm}``: waveform ``[B, S]`` -> ``[B, T50, conv_dim[-1]]`` (GELU after each)."""

    cfg: Wav2Vec2Config

    @nn.compact
    def __call__(self, wav):
        cfg = self.cfg
        x = wav[..., None].astype(dtype_of(cfg.dtype))
        for i, (c, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            x = _Conv1d(c, k, s, use_bias=cfg.conv_bias, dtype=cfg.dtype, name=f"conv_layers_{i}_conv")(x)
            if cfg.feat_extract_norm == "layer":
                x = _Norm(cfg.layer_norm_eps, -1, name=f"conv_layers_{i}_layer_norm")(x)
            elif i == 0:   # GroupNorm(num_groups = channels): per channel over time, eps 1e-5 (torch default)
                x = _Norm(1e-5, 1, name=f"conv_layers_{i}_layer_norm")(x)
            x = jax.nn.gelu(x, approximate=False)
        return x


class EncoderLayer(nn.Module):
    cfg: Wav2Vec2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        ln = lambda name: _Norm(cfg.layer_norm_eps, name=name)  # noqa: E731

        def attn(t):
            b, n, _ = t.shape
            q, k, v = (_Dense(d, cfg.dtype, name=f"attention_{p}_proj")(t).reshape(b, n, h, d // h)
                       for p in ("q", "k", "v"))
            o = attention(q, k, v, cfg.attn_impl).reshape(b, n, d)
            return _Dense(d, cfg.dtype, name="attention_out_proj")(o)

        def ffn(t):
            t = jax.nn.gelu(_Dense(cfg.intermediate_size, cfg.dtype, name="feed_forward_intermediate_dense")(t),
                            approximate=False)
            return _Dense(d, cfg.dtype, name="feed_forward_output_dense")(t)

        if cfg.do_stable_layer_norm:
            x = x + attn(ln("layer_norm")(x))
            return x + ffn(ln("final_layer_norm")(x))
        x = ln("layer_norm")(x + attn(x))
        return ln("final_layer_norm")(x + ffn(x))


class Wav2Vec2(nn.Module):
    """``__call__(wav [B, S], seq_len)`` -> ``[B, seq_len, num_layers, hidden]`` (``hidden_states[1:]``)."""

    cfg: Wav2Vec2Config

    @nn.compact
    def __call__(self, wav, seq_len: int):
        cfg = self.cfg
        feats = FeatureExtractor(cfg, name="feature_extractor")(wav)
        feats = linear_interpolation(feats, seq_len)
        feats = _Norm(cfg.layer_norm_eps, name="feature_projection_layer_norm")(feats)
        x = _Dense(cfg.hidden_size, cfg.dtype, name="feature_projection_projection")(feats)
        k = cfg.num_conv_pos_embeddings
        pos = _Conv1d(cfg.hidden_size, k, padding=k // 2, groups=cfg.num_conv_pos_embedding_groups,
                      dtype=cfg.dtype, name="encoder_pos_conv_embed_conv")(x)
        if k % 2 == 0:   # Wav2Vec2SamePadLayer
            pos = pos[:, :-1]
        x = x + jax.nn.gelu(pos, approximate=False)
        if not cfg.do_stable_layer_norm:
            x = _Norm(cfg.layer_norm_eps, name="encoder_layer_norm")(x)
        outs = []
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"encoder_layers_{i}")(x)
            outs.append(x)
        if cfg.do_stable_layer_norm:  # transformers applies the final norm to the last hidden state
            outs[-1] = _Norm(cfg.layer_norm_eps, name="encoder_layer_norm")(x)
        return jnp.stack(outs, axis=2).astype(jnp.float32)


def linear_interpolation(x, seq_len: int):
    """``F.interpolate(x.transpose(1, 2), size=seq_len, mode='linear', align_corners=True)`` on ``[B, T, C]``
    (official ``torch_utils.linear_interpolation``); source positions computed in float32 as PyTorch does."""
    t_in = x.shape[1]
    if seq_len == t_in:
        return x
    scale = np.float32((t_in - 1) / (seq_len - 1)) if seq_len > 1 else np.float32(0)
    pos = np.arange(seq_len, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(pos).astype(np.int32), t_in - 1)
    i1 = np.minimum(i0 + 1, t_in - 1)
    w = (pos - i0.astype(np.float32)).astype(np.float32)[None, :, None]
    return (x[:, i0] * (1 - w) + x[:, i1] * w).astype(x.dtype)


def num_steps(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """``int(duration * 25)`` audio steps (official ``get_embedding``)."""
    return int(num_samples / sample_rate * fps)


# ------------------------------------------------------------------------------------------- host side


def loudness_norm(wav: np.ndarray, sr: int = SAMPLE_RATE, lufs: float = TARGET_LUFS) -> np.ndarray:
    """Official ``audio_process.loudness_norm``: BS.1770 integrated loudness -> ``lufs``; unchanged when the
    measured loudness is beyond +-100 LUFS (silence measures -inf)."""
    import pyloudnorm as pyln

    meter = pyln.Meter(sr)
    loud = meter.integrated_loudness(wav)
    if abs(loud) > 100:
        return wav
    return pyln.normalize.loudness(wav, loud, lufs)


def normalize_input(wav: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor ``do_normalize``: float32, ``(x - mean) / sqrt(var + 1e-7)``."""
    x = np.asarray(wav, np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def init_params(cfg: Wav2Vec2Config, key, num_samples: int = 4000):
    from flax.linen import meta as nn_meta

    v = Wav2Vec2(cfg).init(key, jnp.zeros((1, num_samples), jnp.float32), 3)
    return nn_meta.unbox(v["params"])


def param_shapes(cfg: Wav2Vec2Config):
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


class Wav2Vec2Encoder:
    """A loaded wav2vec2: ``features(wav16k)`` -> ``[T25, layers, hidden]`` float32 numpy (the official
    ``get_embedding``); ``__call__(wav [B, S], seq_len)`` is the jitted model."""

    def __init__(self, config: Wav2Vec2Config, params):
        self.config = config
        self.params = params
        self.module = Wav2Vec2(config)
        self._fn = jax.jit(lambda p, w, n: self.module.apply({"params": p}, w, n), static_argnums=2)

    def __call__(self, wav, seq_len: int):
        return self._fn(self.params, jnp.asarray(wav, jnp.float32), int(seq_len))

    def features(self, wav: np.ndarray, loudness: bool = True) -> np.ndarray:
        """16 kHz mono waveform -> ``[int(dur * 25), layers, hidden]`` (loudness norm, input norm, model)."""
        wav = np.asarray(wav, np.float64)
        if wav.ndim != 1:
            raise ValueError(f"expected a mono waveform [samples], got shape {wav.shape}")
        n = num_steps(len(wav))
        if n < 1:
            raise ValueError(f"audio of {len(wav)} samples is shorter than one video frame at {FPS} fps")
        if loudness:
            wav = loudness_norm(wav)
        x = normalize_input(wav) if self.config.do_normalize else np.asarray(wav, np.float32)
        return np.asarray(self(x[None], n))[0]

    @classmethod
    def from_dir(cls, directory: str, dtype=None, param_dtype=None, attn_impl: str | None = None):
        from svi_jax.model_dirs import load_model_dir

        cfg, params = load_model_dir(directory, KIND, Wav2Vec2Config, param_shapes, "wav2vec2", dtype, param_dtype,
                                     attn_impl=attn_impl)
        return cls(cfg, params)

    def save(self, directory: str) -> str:
        from svi_jax.model_dirs import save_model

        return save_model(directory, KIND, self.config.to_dict(), jax.device_get(self.params))


_LAYOUT_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "3.0(back)": 3, "quad": 4, "quad(side)": 4,
                    "4.0": 4, "4.1": 5, "5.0": 5, "5.0(side)": 5, "5.1": 6, "5.1(side)": 6, "6.0": 6, "6.1": 7,
                    "7.0": 7, "7.1": 8, "7.1(wide)": 8}


def read_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio or video file -> mono float32 waveform at ``sample_rate``, decoded by the ffmpeg binary that
    ships with ``imageio-ffmpeg`` (already a dependency for video; it reads wav/mp3/m4a/flac and the audio track
    of mp4/mov/mkv with one code path, and muxes the output too). Channels are averaged as ``librosa.load``
    (the official reader) does, not with ffmpeg's ``-ac 1`` matrix (which scales stereo by sqrt 2)."""
    import os
    import re
    import subprocess

    import imageio_ffmpeg

    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file {path} does not exist")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path, "-vn", "-ar", str(sample_rate),
           "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    r = subprocess.run(cmd, capture_output=True)
    err = r.stderr.decode(errors="replace")
    if r.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise ValueError(f"cannot read audio from {path}: {lines[-1] if lines else 'ffmpeg failed'}")
    m = re.search(r"Output #0.*?Audio: pcm_f32le[^,]*, \d+ Hz, ([^,\n]+)", err, re.S)
    layout = m.group(1).strip() if m else "mono"
    n = re.match(r"(\d+) channels", layout)
    channels = int(n.group(1)) if n else _LAYOUT_CHANNELS.get(layout)
    if channels is None:
        raise ValueError(f"cannot read audio from {path}: unknown channel layout {layout!r}")
    wav = np.frombuffer(r.stdout, np.float32)
    if wav.size == 0:
        raise ValueError(f"{path} has no audio samples")
    return wav.reshape(-1, channels).mean(axis=1).astype(np.float32)
