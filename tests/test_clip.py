"""CLIP vision tower: parity with transformers CLIPVisionModel hidden_states[-2] (+ Wan's preprocessing)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import svi_jax  # noqa: E402
from svi_jax.model_dirs import flatten  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN as OPENAI_MEAN  # noqa: E402  (the reference's, not ours)
from transformers.image_utils import OPENAI_CLIP_STD as OPENAI_STD  # noqa: E402

from svi_jax.models.clip import CLIPConfig, CLIPVision, preprocess  # noqa: E402
from tests.torch_ref import from_torch_cli, max_rel_err  # noqa: E402

TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, image_size=42,
            patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)



def official_state_dict(hf_sd: dict, num_layers: int) -> dict:
    """transformers CLIPVisionModel names -> Wan's open-clip names (wan/modules/clip.py:XLMRobertaCLIP)."""
    dim = hf_sd["embeddings.class_embedding"].shape[0]
    out = {"visual.patch_embedding.weight": hf_sd["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": hf_sd["embeddings.class_embedding"].reshape(1, 1, dim),
           "visual.pos_embedding": hf_sd["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": hf_sd["pre_layrnorm.weight"], "visual.pre_norm.bias": hf_sd["pre_layrnorm.bias"],
           "visual.post_norm.weight": hf_sd["post_layernorm.weight"],
           "visual.post_norm.bias": hf_sd["post_layernorm.bias"],
           "visual.head": torch.randn(dim, 8),                       # projection head: unused by Wan
           "log_scale": torch.tensor(2.0),
           "textual.token_embedding.weight": torch.randn(11, 8),     # text tower: not converted
           "textual.head.0.weight": torch.randn(8, 8)}
    for i in range(num_layers):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for wb in ("weight", "bias"):
            out[o + f"norm1.{wb}"] = hf_sd[h + f"layer_norm1.{wb}"]
            out[o + f"norm2.{wb}"] = hf_sd[h + f"layer_norm2.{wb}"]
            out[o + f"attn.to_qkv.{wb}"] = torch.cat([hf_sd[h + f"self_attn.{n}_proj.{wb}"] for n in "qkv"], 0)
            out[o + f"attn.proj.{wb}"] = hf_sd[h + f"self_attn.out_proj.{wb}"]
            out[o + f"mlp.0.{wb}"] = hf_sd[h + f"mlp.fc1.{wb}"]
            out[o + f"mlp.2.{wb}"] = hf_sd[h + f"mlp.fc2.{wb}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_((1.0 if "class_embedding" in name else 0.1) * torch.randn_like(p))
            elif "position_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
    d = tmp_path_factory.mktemp("clip_hf")
    model.save_pretrained(d)
    return model, str(d)


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    dst = tmp_path_factory.mktemp("clip_ours")
    assert from_torch_cli("clip", "--src", ref[1], "--dst", dst) == 0
    return str(dst)


def wan_reference(model, images: np.ndarray, size: int) -> np.ndarray:
    """Wan's CLIPModel.visual: bicubic resize of [-1, 1] images, to [0, 1], OpenAI mean/std, hidden_states[-2]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states[-2].numpy()


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_bicubic_resize_matches_torch():
    cfg = CLIPConfig(image_size=224, patch_size=14, dim=16, mlp_dim=16, num_heads=1, num_layers=1)
    for h, w in ((480, 832), (224, 224), (100, 301)):
        x = images((1, h, w, 3), seed=h)
        ours = np.asarray(preprocess(jnp.asarray(x), cfg))
        t = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(224, 224),
                                            mode="bicubic", align_corners=False)
        t = ((t * 0.5 + 0.5 - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None])
        np.testing.assert_allclose(ours, t.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_parity_transformers_layout(ref, converted):
    model, _ = ref
    enc = svi_jax.load(converted)
    assert isinstance(enc, CLIPVision)
    c = enc.config
    assert (c.image_size, c.patch_size, c.dim, c.mlp_dim, c.num_heads, c.num_layers, c.activation) == \
        (42, 14, 48, 80, 3, 2, "gelu")
    for shape in ((3, 37, 61, 3), (2, 42, 42, 3)):        # resized (up and down) and already at size
        x = images(shape, seed=shape[1])
        out = enc.encode(x)
        want = wan_reference(model, x, 42)
        err = max_rel_err(out, want)
        print(f"CLIP transformers-layout parity {shape}: max rel err {err:.2e}")
        assert out.shape == (shape[0], 10, 48)
        assert err <= 1e-4
    out16 = svi_jax.load(converted, dtype="bfloat16", param_dtype="bfloat16").encode(x)
    assert out16.dtype == jnp.bfloat16 and max_rel_err(out16, want) < 3e-2


def test_parity_official_layout(ref, converted, tmp_path):
    model, _ = ref
    sd = official_state_dict(model.state_dict(), TINY["num_hidden_layers"])
    src = tmp_path / "wan"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"dim": 5120, "num_layers": 40}))   # the DiT's, must be ignored
    torch.save(sd, src / "clip.pth")
    dst = tmp_path / "ours"
    assert from_torch_cli("clip", "--src", src / "clip.pth", "--dst", dst, "--num-heads", 3) == 0
    ours, theirs = svi_jax.load(str(dst)), svi_jax.load(converted)
    assert ours.config == theirs.config
    a, b = flatten(ours.params), flatten(theirs.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    x = images((2, 50, 30, 3), seed=5)
    err = max_rel_err(ours.encode(x), wan_reference(model, x, 42))
    print(f"CLIP official-layout parity: max rel err {err:.2e}")
    assert err <= 1e-4


def test_prefixed_clipmodel_layout(ref, converted, tmp_path):
    """An older / full ``CLIPModel`` checkpoint: ``vision_model.`` keys beside a text tower and projections."""
    from safetensors.torch import save_file

    model, _ = ref
    sd = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.tensor(1.0),
               "visual_projection.weight": torch.zeros(4, 48)})
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {**TINY}}))
    dst = tmp_path / "ours"
    assert from_torch_cli("clip", "--src", tmp_path, "--dst", dst) == 0
    a, b = flatten(svi_jax.load(str(dst)).params), flatten(svi_jax.load(converted).params)
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_logical_axes(converted):
    axes = flatten(svi_jax.load(converted).logical_axes)
    assert tuple(axes["blocks/attn/q/kernel"]) == ("layers", "embed", "heads")
    assert tuple(axes["blocks/attn/o/kernel"]) == ("layers", "heads", "embed")
    assert tuple(axes["blocks/mlp/fc1/kernel"]) == ("layers", "embed", "mlp")
    assert tuple(axes["pos_embedding"]) == (None, "embed")
    assert all(tuple(v)[0] == "layers" for k, v in axes.items() if k.startswith("blocks/"))


def test_bad_checkpoints(ref, tmp_path, capsys):
    from svi_jax.convert import clip as conv

    model, _ = ref
    sd = official_state_dict(model.state_dict(), TINY["num_hidden_layers"])

    def attempt(state, name, **kw):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(ConversionError) as e:
            conv.convert(str(path), **kw)
        return str(e.value)

    assert "--num_heads" in attempt(sd, "noheads")                     # width 48: head count unknown
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.1.mlp.2.bias"}
    assert "visual.transformer.1.mlp.2.bias" in attempt(missing, "missing", num_heads=3)
    bad = dict(sd, **{"visual.transformer.0.attn.to_qkv.weight": torch.zeros(3 * 48 + 3, 48)})
    msg = attempt(bad, "qkv", num_heads=3)
    assert "visual.transformer.0.attn.to_qkv.weight" in msg and "147" in msg
    bad = dict(sd, **{"visual.transformer.1.mlp.0.bias": torch.zeros(81)})
    msg = attempt(bad, "shape", num_heads=3)
    assert "visual.transformer.1.mlp.0.bias" in msg and "(80,)" in msg and "(81,)" in msg
    one = {k: v for k, v in sd.items() if not k.startswith(("visual.transformer.1.", "visual.transformer.2."))}
    assert "at least 2" in attempt(one, "one", num_heads=3)
    assert "does not look like a CLIP" in attempt({"foo": torch.zeros(1)}, "unknown")
    torch.save(missing, tmp_path / "m.pth")
    assert from_torch_cli("clip", "--src", tmp_path / "m.pth", "--dst", tmp_path / "out", "--num-heads", 3) == 2
    assert "visual.transformer.1.mlp.2.bias" in capsys.readouterr().err
