"""UMT5 encoder + tokenizer: parity with transformers UMT5EncoderModel through our converters (both layouts)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import svi_jax  # noqa: E402
from svi_jax.model_dirs import flatten  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.models.t5 import T5Encoder, relative_position_buckets  # noqa: E402
from svi_jax.models.tokenizer import Tokenizer, clean_text  # noqa: E402
from tests.torch_ref import from_torch_cli, max_rel_err  # noqa: E402

TEXT_LEN = 16
TINY = dict(vocab_size=64, d_model=32, d_kv=6, num_heads=4, d_ff=40, num_layers=3, relative_attention_num_buckets=8,
            relative_attention_max_distance=12, feed_forward_proj="gated-gelu", dropout_rate=0.0)



def official_state_dict(hf_sd: dict, num_layers: int) -> dict:
    """transformers UMT5 names -> the official Wan names (module names of wan/modules/t5.py:T5Encoder)."""
    out = {"token_embedding.weight": hf_sd["shared.weight"], "norm.weight": hf_sd["encoder.final_layer_norm.weight"]}
    per_block = {"layer.0.layer_norm.weight": "norm1.weight",
                 "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
                 "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
                 "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                 "layer.1.layer_norm.weight": "norm2.weight",
                 "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",   # the GELU-activated branch
                 "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                 "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    for i in range(num_layers):
        for theirs, ours in per_block.items():
            out[f"blocks.{i}.{ours}"] = hf_sd[f"encoder.block.{i}.{theirs}"]
    assert len(out) == 2 + 10 * num_layers
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny random UMT5 encoder (every parameter randomised) saved in the transformers layout."""
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(**TINY)
    model = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "shared" in name or "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[1]))
    d = tmp_path_factory.mktemp("umt5_hf")
    model.save_pretrained(d)
    return model, str(d)


def padded_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [TEXT_LEN, 5, 1, 11]
    ids = np.zeros((len(lengths), TEXT_LEN), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, TINY["vocab_size"], n)
        ids[i, n - 1] = 1
        mask[i, :n] = 1
    return ids, mask


def torch_ref(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(mask, np.int64))).last_hidden_state.numpy()
    return out * np.asarray(mask)[..., None]


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    model, hf_dir = ref
    dst = tmp_path_factory.mktemp("umt5_ours")
    assert from_torch_cli("t5", "--src", hf_dir, "--dst", dst, "--text-len", TEXT_LEN) == 0
    return str(dst)


def test_position_buckets_match_transformers():
    cfg = transformers.UMT5Config(**{**TINY, "relative_attention_num_buckets": 32,
                                     "relative_attention_max_distance": 128})
    att = transformers.models.umt5.modeling_umt5.UMT5Attention(cfg, has_relative_attention_bias=True)
    for n, nb, md in ((512, 32, 128), (TEXT_LEN, 8, 12)):
        att.relative_attention_num_buckets, att.relative_attention_max_distance = nb, md
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        want = att._relative_position_bucket(rel).numpy()
        np.testing.assert_array_equal(relative_position_buckets(n, n, nb, md), want)


def test_parity_transformers_layout(ref, converted):
    model, _ = ref
    enc = svi_jax.load(converted)
    assert isinstance(enc, T5Encoder)
    c = enc.config
    assert (c.vocab_size, c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_layers, c.num_buckets, c.max_distance) == \
        (64, 32, 24, 40, 4, 3, 8, 12)
    ids, mask = padded_batch()
    emb, out_mask = enc.encode_ids(ids, mask)
    want = torch_ref(model, ids, mask)
    err = max_rel_err(emb, want)
    print(f"UMT5 transformers-layout parity: max rel err {err:.2e}")
    assert emb.shape == (4, TEXT_LEN, 32)
    assert err <= 1e-4
    np.testing.assert_array_equal(np.asarray(out_mask), mask)
    assert np.all(np.asarray(emb)[mask == 0] == 0)              # padded positions are exactly zero
    assert np.abs(np.asarray(emb)[mask == 1]).min(axis=-1).max() > 0
    # a batch element does not depend on what it is batched with
    one, _ = enc.encode_ids(ids[1:2], mask[1:2])
    assert max_rel_err(one[0], emb[1]) <= 1e-5
    # bf16 (how Wan runs UMT5) stays close
    emb16, _ = svi_jax.load(converted, dtype="bfloat16", param_dtype="bfloat16").encode_ids(ids, mask)
    assert emb16.dtype == jnp.bfloat16 and max_rel_err(emb16, want) < 3e-2


def test_parity_official_layout(ref, converted, tmp_path):
    model, _ = ref
    sd = official_state_dict(model.state_dict(), TINY["num_layers"])
    src = tmp_path / "wan"
    src.mkdir()
    # the Wan release dir has the DiT's config.json beside the .pth: it must not be read as the T5's
    (src / "config.json").write_text(json.dumps({"num_layers": 40, "dim": 5120, "_class_name": "WanModel"}))
    torch.save(sd, src / "models_t5_umt5-xxl-enc-bf16.pth")
    dst = tmp_path / "ours"
    assert from_torch_cli("t5", "--src", src / "models_t5_umt5-xxl-enc-bf16.pth", "--dst", dst, "--text-len", TEXT_LEN,
               "--max-distance", 12) == 0
    ours, theirs = svi_jax.load(str(dst)), svi_jax.load(converted)
    assert ours.config == theirs.config
    a, b = flatten(ours.params), flatten(theirs.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    ids, mask = padded_batch(1)
    emb, _ = ours.encode_ids(ids, mask)
    err = max_rel_err(emb, torch_ref(model, ids, mask))
    print(f"UMT5 official-layout parity: max rel err {err:.2e}")
    assert err <= 1e-4

    # bf16 official weights (as released) are kept in bf16 by default
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, src / "bf16.pth")
    assert from_torch_cli("t5", "--src", src / "bf16.pth", "--dst", tmp_path / "bf16", "--max-distance", 12) == 0
    enc16 = svi_jax.load(str(tmp_path / "bf16"))
    assert enc16.config.param_dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(enc16.params["norm"]["scale"], np.float32),
                                  sd["norm.weight"].to(torch.bfloat16).float().numpy())


def test_logical_axes(converted):
    axes = flatten(svi_jax.load(converted).logical_axes)
    assert tuple(axes["token_embedding"]) == ("vocab", "embed")
    assert tuple(axes["blocks/attn/q/kernel"]) == ("layers", "embed", "heads")
    assert tuple(axes["blocks/attn/o/kernel"]) == ("layers", "heads", "embed")
    assert tuple(axes["blocks/ffn/gate/kernel"]) == ("layers", "embed", "mlp")
    assert tuple(axes["blocks/ffn/fc2/kernel"]) == ("layers", "mlp", "embed")
    assert tuple(axes["blocks/pos_embedding"])[0] == "layers"
    assert all(tuple(v)[0] == "layers" for k, v in axes.items() if k.startswith("blocks/"))


def test_bad_checkpoints(ref, tmp_path, capsys):
    from svi_jax.convert import t5 as conv

    model, _ = ref
    sd = official_state_dict(model.state_dict(), TINY["num_layers"])

    def attempt(state, name):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(ConversionError) as e:
            conv.convert(str(path))
        return str(e.value)

    missing = dict(sd)
    del missing["blocks.1.ffn.fc1.weight"]
    assert "blocks.1.ffn.fc1.weight" in attempt(missing, "missing")
    bad = dict(sd, **{"blocks.2.attn.k.weight": torch.zeros(24, 31)})
    msg = attempt(bad, "shape")
    assert "blocks.2.attn.k.weight" in msg and "(32, 24)" in msg and "(31, 24)" in msg
    extra = dict(sd, **{"blocks.0.attn.extra.weight": torch.zeros(3)})
    assert "blocks.0.attn.extra.weight" in attempt(extra, "extra")
    t5_like = {k: v for k, v in sd.items() if not (k.endswith("pos_embedding.embedding.weight")
                                                   and not k.startswith("blocks.0."))}
    assert "shared bias" in attempt(t5_like, "t5")
    assert "does not look like a UMT5" in attempt({"foo.weight": torch.zeros(2)}, "unknown")
    # the CLI reports the error and exits with 2
    torch.save(missing, tmp_path / "m.pth")
    assert from_torch_cli("t5", "--src", tmp_path / "m.pth", "--dst", tmp_path / "out") == 2
    assert "blocks.1.ffn.fc1.weight" in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


# ------------------------------------------------------------------------------------------ tokenizer

SENTENCES = ["a cat sits on the mat", "the quick brown fox jumps over the lazy dog", "a red car drives at night",
             "stable video infinity generates long videos", "a person walks in the park at sunset"]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """A tiny sentencepiece model trained here: ``spiece.model`` alone, and a transformers T5 tokenizer dir."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 10), model_writer=buf, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    sp_dir = tmp_path_factory.mktemp("tok_sp")
    (sp_dir / "spiece.model").write_bytes(buf.getvalue())
    hf_dir = tmp_path_factory.mktemp("tok_hf")
    transformers.T5Tokenizer.from_pretrained(str(sp_dir), extra_ids=0).save_pretrained(str(hf_dir))
    return str(sp_dir), str(hf_dir)


def test_tokenizer(tok_dirs):
    sp_dir, hf_dir = tok_dirs
    texts = ["a cat walks  in\tthe park ", "zoom", "the quick brown fox jumps over the lazy dog " * 3,
             "Tom &amp; a dog"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "spiece.model"))
    tok_sp, tok_hf = Tokenizer(sp_dir, TEXT_LEN), Tokenizer(hf_dir, TEXT_LEN)
    assert (tok_sp.backend, tok_hf.backend) == ("sentencepiece", "transformers")
    ids, mask = tok_sp(texts)
    ids_hf, mask_hf = tok_hf(texts)
    np.testing.assert_array_equal(ids, ids_hf)
    np.testing.assert_array_equal(mask, mask_hf)
    assert ids.shape == mask.shape == (4, TEXT_LEN) and ids.dtype == np.int32
    for i, t in enumerate(texts):
        pieces = sp.encode(clean_text(t))[: TEXT_LEN - 1] + [1]          # Wan: add_special_tokens -> </s>
        n = len(pieces)
        np.testing.assert_array_equal(ids[i, :n], pieces)
        assert mask[i, :n].all() and not mask[i, n:].any() and (ids[i, n:] == 0).all()
    assert mask[2].all() and ids[2, -1] == 1                             # truncated, still ends with </s>
    assert clean_text(texts[0]) == "a cat walks in the park"
    assert clean_text(texts[3]) == "Tom & a dog"
    np.testing.assert_array_equal(tok_sp("a  cat")[0], tok_sp(["a cat"])[0])


def test_encode_texts_end_to_end(ref, tok_dirs, tmp_path):
    model, hf_dir = ref
    _, tok_dir = tok_dirs
    dst = tmp_path / "with_tok"
    assert from_torch_cli("t5", "--src", hf_dir, "--dst", dst, "--text-len", TEXT_LEN, "--tokenizer", tok_dir) == 0
    assert (dst / "tokenizer" / "tokenizer_config.json").exists()
    enc = svi_jax.load(str(dst))
    texts = ["a cat sits on the mat", "a red car"]
    emb, mask = enc.encode(texts)
    ids, mask_t = Tokenizer(tok_dir, TEXT_LEN)(texts)
    np.testing.assert_array_equal(np.asarray(mask), mask_t)
    err = max_rel_err(emb, torch_ref(model, ids, mask_t))
    print(f"UMT5 encode(texts) parity: max rel err {err:.2e}")
    assert err <= 1e-4
    # save() round trip keeps the tokenizer
    enc.save(str(tmp_path / "resaved"))
    emb2, _ = svi_jax.load(str(tmp_path / "resaved")).encode(texts)
    np.testing.assert_array_equal(np.asarray(emb2), np.asarray(emb))
    with pytest.raises(RuntimeError, match="no tokenizer"):
        T5Encoder(enc.config, enc.params).encode(texts)
    with pytest.raises(ConversionError, match="no tokenizer files"):
        from svi_jax.convert import t5 as conv
        import argparse

        p = argparse.ArgumentParser()
        conv.add_arguments(p)
        conv.run(p.parse_args(["--src", hf_dir, "--dst", str(tmp_path / "x"), "--tokenizer", str(tmp_path)]))
    jax.clear_caches()
