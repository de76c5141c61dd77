"""CLIP ViT-H/14 vision tower as Wan uses it (``wan/modules/clip.py``, ``CLIPModel.visual``), in Flax.

Wan's image conditioning: images in [-1, 1] are resized to 224x224 with *bicubic* interpolation
(``F.interpolate(mode='bicubic', align_corners=False)``, no antialias, aspect ratio not kept), mapped to [0, 1] and
normalised with the OpenAI CLIP mean/std; the ViT (patch 14, cls token, learned positions, pre-LayerNorm, exact GELU
MLP) runs all blocks *but the last* (``use_31_block=True`` = transformers ``hidden_states[-2]``), and the tokens are
returned without post-LayerNorm: ``[B, 257, 1280]``. Only the blocks that run are stored (31 of 32).

Parameters (blocks stacked on a leading 'layers' axis by ``nn.scan``)::

    patch_embedding/kernel      [p*p*3, dim]      (None, 'embed')   (rows ordered (py, px, c))
    cls_embedding               [dim]             ('embed',)
    pos_embedding               [1 + n, dim]      (None, 'embed')
    pre_norm/{scale,bias}       [dim]
    blocks/norm{1,2}/{scale,bias}
    blocks/attn/{q,k,v}/{kernel,bias}  [L, dim, dim]   ('layers', 'embed', 'heads')
    blocks/attn/o/{kernel,bias}        [L, dim, dim]   ('layers', 'heads', 'embed')
    blocks/mlp/fc1/{kernel,bias}       [L, dim, mlp]   ('layers', 'embed', 'mlp')
    blocks/mlp/fc2/{kernel,bias}       [L, mlp, dim]   ('layers', 'mlp', 'embed')
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from svi_jax.models.layers import LayerNorm, Linear, attention, dtype_of

KIND = "clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 31          # blocks that run (the source tower has one more)
    eps: float = 1e-5
    activation: str = "gelu"      # exact GELU for open-clip ViT-H/14 in Wan
    mean: Sequence[float] = OPENAI_MEAN
    std: Sequence[float] = OPENAI_STD
    dtype: str = "float32"
    param_dtype: str = "float32"
    attn_impl: str = "auto"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def _act(name):
    return {"gelu": partial(jax.nn.gelu, approximate=False), "gelu_tanh": partial(jax.nn.gelu, approximate=True),
            "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}[name]


# ------------------------------------------------------------------------------------------ preprocessing

def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """``[out, in]`` weights of PyTorch's ``interpolate(mode='bicubic', align_corners=False)`` (no antialias)."""
    f = np.float32
    a = f(a)

    def k1(x):  # |x| <= 1
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def k2(x):  # 1 < |x| < 2
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    m = np.zeros((out_size, in_size), np.float32)
    scale = f(in_size) / f(out_size)      # float32, as torch; its source position is one fused multiply-add
    for i in range(out_size):
        src = f(np.float64(scale) * (i + 0.5) - 0.5)
        i0 = int(np.floor(src))
        t = src - f(i0)
        for j, w in zip(range(i0 - 1, i0 + 3), (k2(t + f(1)), k1(t), k1(f(1) - t), k2(f(2) - t))):
            m[i, min(max(j, 0), in_size - 1)] += w
    return m


def preprocess(images, cfg: CLIPConfig):
    """``[B, H, W, 3]`` in [-1, 1] -> Wan's normalised ``[B, S, S, 3]`` (bicubic resize to ``image_size``)."""
    s = cfg.image_size
    x = images.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if x.shape[1] != s:
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bicubic_matrix(x.shape[1], s)), x, precision=hi)
    if x.shape[2] != s:
        x = jnp.einsum("pw,bowc->bopc", jnp.asarray(bicubic_matrix(x.shape[2], s)), x, precision=hi)
    x = x * 0.5 + 0.5
    return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


# ------------------------------------------------------------------------------------------ model

def _linear(c: CLIPConfig, features: int, axes, name: str):
    return Linear(features, axes, use_bias=True, dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype),
                  name=name)


class _Attention(nn.Module):
    cfg: CLIPConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        q, k, v = (rearrange(_linear(c, c.dim, ("embed", "heads"), n)(x), "b l (h d) -> b l h d", h=c.num_heads)
                   for n in ("q", "k", "v"))
        o = rearrange(attention(q, k, v, impl=c.attn_impl), "b l h d -> b l (h d)")
        return _linear(c, c.dim, ("heads", "embed"), "o")(o)


class _MLP(nn.Module):
    cfg: CLIPConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = _act(c.activation)(_linear(c, c.mlp_dim, ("embed", "mlp"), "fc1")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return _linear(c, c.dim, ("mlp", "embed"), "fc2")(h)


class CLIPBlock(nn.Module):
    """Pre-norm ViT block; scan-compatible ``(x, _) -> (x, None)``."""

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, x, _=None):
        c = self.cfg
        norm = partial(LayerNorm, eps=c.eps, affine=True, param_dtype=dtype_of(c.param_dtype))
        x = x + _Attention(c, name="attn")(norm(name="norm1")(x))
        x = x + _MLP(c, name="mlp")(norm(name="norm2")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class CLIPVisionTower(nn.Module):
    """Normalised pixels ``[B, S, S, 3]`` -> penultimate-block tokens ``[B, 1 + (S/p)^2, dim]``."""

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        p = c.patch_size
        x = rearrange(pixels, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        x = Linear(c.dim, (None, "embed"), use_bias=False, dtype=dt, param_dtype=pdt, name="patch_embedding")(x)
        cls = self.param("cls_embedding", nn.with_logical_partitioning(nn.initializers.normal(c.dim ** -0.5),
                                                                       ("embed",)), (c.dim,), pdt)
        pos = self.param("pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(c.dim ** -0.5),
                                                                       (None, "embed")), (c.num_tokens, c.dim), pdt)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (x.shape[0], 1, c.dim)), x], axis=1)
        x = x + pos.astype(dt)[None]
        x = LayerNorm(c.eps, affine=True, param_dtype=pdt, name="pre_norm")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        blocks = nn.scan(CLIPBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, name="blocks")(x, None)
        return x


def clip_tokens(cfg: CLIPConfig, params, images):
    """CLIP tokens ``[B, 1 + (image_size/patch)^2, dim]`` of frames ``[B, H, W, 3]`` in [-1, 1]: Wan's preprocessing,
    then the tower computing in ``cfg.dtype``. Pure and jittable; the one "apply CLIP to frames" of the package
    (training, the latent cache, sampling and :class:`CLIPVision` all call it)."""
    return CLIPVisionTower(cfg).apply({"params": params}, preprocess(images, cfg).astype(dtype_of(cfg.dtype)))


def _dummy(cfg: CLIPConfig):
    return jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)


def param_shapes(cfg: CLIPConfig):
    tree = jax.eval_shape(lambda: CLIPVisionTower(cfg).init(jax.random.PRNGKey(0), _dummy(cfg)))["params"]
    return nn.meta.unbox(tree)


def logical_axes(cfg: CLIPConfig):
    boxed = jax.eval_shape(lambda: CLIPVisionTower(cfg).init(jax.random.PRNGKey(0), _dummy(cfg)))["params"]
    return nn.get_partition_spec(boxed)


class CLIPVision:
    """A loaded vision tower: ``encode(images [B, H, W, 3] in [-1, 1]) -> [B, 257, 1280]``."""

    def __init__(self, config: CLIPConfig | dict, params):
        self.config = config if isinstance(config, CLIPConfig) else CLIPConfig.from_dict(config)
        self.params = params
        self.module = CLIPVisionTower(self.config)
        self._fn = jax.jit(lambda p, img: clip_tokens(self.config, p, img))

    @classmethod
    def init(cls, config: CLIPConfig | dict, seed: int = 0) -> "CLIPVision":
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_dict(config)
        params = nn.meta.unbox(CLIPVisionTower(cfg).init(jax.random.PRNGKey(seed), _dummy(cfg))["params"])
        return cls(cfg, params)

    @classmethod
    def from_dir(cls, directory: str, dtype=None, param_dtype=None, attn_impl: str | None = None) -> "CLIPVision":
        """Load a directory written by ``convert/from_torch.py clip`` or :meth:`save`."""
        from svi_jax.model_dirs import load_model_dir

        cfg, params = load_model_dir(directory, KIND, CLIPConfig, param_shapes, "CLIP", dtype, param_dtype,
                                     attn_impl=attn_impl)
        return cls(cfg, params)

    def save(self, directory: str) -> str:
        from svi_jax.model_dirs import save_model

        return save_model(directory, KIND, self.config.to_dict(), jax.device_get(self.params))

    @property
    def logical_axes(self):
        return logical_axes(self.config)

    def encode(self, images):
        """``[B, H, W, 3]`` in [-1, 1] (any H, W) -> ``[B, 1 + (image_size/patch)^2, dim]``."""
        images = jnp.asarray(images)
        chex.assert_rank(images, 4)
        if images.shape[-1] != 3:
            raise ValueError(f"images must be channels-last RGB [B, H, W, 3], got shape {images.shape}")
        return self._fn(self.params, images)

    def __call__(self, images):
        return self.encode(images)
