"""SVI-Talk MultiTalk audio layers in the DiT vs a PyTorch transcription of the official code, loaded through our
converter (official Wan shards + ``multitalk.safetensors``)."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

import svi_jax  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.convert.dit import convert  # noqa: E402
from tests.test_dit import _inputs, _torch_forward, _write_official  # noqa: E402
from tests.torch_ref import max_rel_err, randomize_, tiny_wan_diffusers  # noqa: E402

TOL = 1e-5
A = dict(audio_in_dim=16, audio_layers=3, audio_window=5, audio_vae_scale=4, audio_hidden=24, audio_tokens=4,
         audio_dim=12)


# --- PyTorch reference, transcribed from vita-epfl/Stable-Video-Infinity @34e4c50 --------------------------------
class AudioProjModel(tnn.Module):
    """diffsynth/models/wan_video_dit.py L52-113 (norm_output_audio=True as built at L454-470)."""

    def __init__(self, seq_len, seq_len_vf, blocks, channels, intermediate_dim, output_dim, context_tokens):
        super().__init__()
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = tnn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj1_vf = tnn.Linear(seq_len_vf * blocks * channels, intermediate_dim)
        self.proj2 = tnn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = tnn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = tnn.LayerNorm(output_dim)

    def forward(self, audio_embeds, audio_embeds_vf):
        video_length = audio_embeds.shape[1] + audio_embeds_vf.shape[1]
        B, _, _, S, C = audio_embeds.shape
        audio_embeds = rearrange(audio_embeds, "bz f w b c -> (bz f) w b c")
        batch_size, window_size, blocks, channels = audio_embeds.shape
        audio_embeds = audio_embeds.view(batch_size, window_size * blocks * channels)
        audio_embeds_vf = rearrange(audio_embeds_vf, "bz f w b c -> (bz f) w b c")
        batch_size_vf, window_size_vf, blocks_vf, channels_vf = audio_embeds_vf.shape
        audio_embeds_vf = audio_embeds_vf.view(batch_size_vf, window_size_vf * blocks_vf * channels_vf)
        audio_embeds = torch.relu(self.proj1(audio_embeds))
        audio_embeds_vf = torch.relu(self.proj1_vf(audio_embeds_vf))
        audio_embeds = rearrange(audio_embeds, "(bz f) c -> bz f c", bz=B)
        audio_embeds_vf = rearrange(audio_embeds_vf, "(bz f) c -> bz f c", bz=B)
        audio_embeds_c = torch.concat([audio_embeds, audio_embeds_vf], dim=1)
        batch_size_c, N_t, C_a = audio_embeds_c.shape
        audio_embeds_c = audio_embeds_c.view(batch_size_c * N_t, C_a)
        audio_embeds_c = torch.relu(self.proj2(audio_embeds_c))
        context_tokens = self.proj3(audio_embeds_c).reshape(batch_size_c * N_t, self.context_tokens, self.output_dim)
        context_tokens = self.norm(context_tokens)
        return rearrange(context_tokens, "(bz f) m c -> bz f m c", f=video_length)


class SingleStreamAttention(tnn.Module):
    """diffsynth/models/attention.py L282-371 (qk_norm=False, no sequence parallel; xformers' attention with its
    default 1/sqrt(head_dim) scale written as scaled_dot_product_attention)."""

    def __init__(self, dim, encoder_hidden_states_dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = tnn.Linear(dim, dim, bias=True)
        self.proj = tnn.Linear(dim, dim)
        self.kv_linear = tnn.Linear(encoder_hidden_states_dim, dim * 2, bias=True)

    def forward(self, x, encoder_hidden_states, shape):
        N_t, N_h, N_w = shape
        x = rearrange(x, "B (N_t S) C -> (B N_t) S C", N_t=N_t)
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).permute((0, 2, 1, 3))
        _, N_a, _ = encoder_hidden_states.shape
        encoder_kv = self.kv_linear(encoder_hidden_states)
        encoder_kv = encoder_kv.view(B, N_a, 2, self.num_heads, self.head_dim).permute((2, 0, 3, 1, 4))
        encoder_k, encoder_v = encoder_kv.unbind(0)
        x = F.scaled_dot_product_attention(q, encoder_k, encoder_v)          # [B, H, M, K]
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return rearrange(x, "(B N_t) S C -> B (N_t S) C", N_t=N_t)


def _block_forward_with_audio(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """diffusers' WanTransformerBlock.forward with the official audio branch inserted after the cross-attention
    and before the FFN (wan_video_dit.py DiTBlock.forward L345-367: ``x = x + audio_cross_attn(norm_x(x))``,
    norm_x = WanLayerNorm(dim, eps, elementwise_affine=True) in float32, no gate)."""
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        self.scale_shift_table + temb.float()).chunk(6, dim=1)
    norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
    norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    # audio (batch 1, as official: audio tokens [1, N_t, M, C] -> squeeze(0))
    x_a = self.audio_cross_attn(self.norm_x(hidden_states.float()), self._audio.squeeze(0), self._grid)
    hidden_states = hidden_states + x_a
    norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
    ff_output = self.ffn(norm_hidden_states)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def _attach_audio(model, seed=0):
    """Official-shaped audio layers on the diffusers tiny model; returns (audio_proj, {official key: tensor})."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    proj = randomize_(AudioProjModel(A["audio_window"], A["audio_window"] + A["audio_vae_scale"] - 1,
                                     A["audio_layers"], A["audio_in_dim"], A["audio_hidden"], A["audio_dim"],
                                     A["audio_tokens"]), seed)
    sd = {f"audio_proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()}
    for i, blk in enumerate(model.blocks):
        blk.audio_cross_attn = randomize_(SingleStreamAttention(dim, A["audio_dim"], model.config.num_attention_heads),
                                          seed + 1 + i)
        blk.norm_x = randomize_(tnn.LayerNorm(dim, eps=1e-6, elementwise_affine=True), seed + 50 + i)
        blk.forward = types.MethodType(_block_forward_with_audio, blk)
        for name in ("audio_cross_attn", "norm_x"):
            sd.update({f"blocks.{i}.{name}.{k}": v.detach().clone()
                       for k, v in getattr(blk, name).state_dict().items()})
    return proj, sd


def _audio_inputs(batch, frames, seed=0):
    r = np.random.RandomState(seed)
    w, n = A["audio_window"], A["audio_vae_scale"]
    first = r.randn(batch, 1, w, A["audio_layers"], A["audio_in_dim"]).astype(np.float32)
    later = r.randn(batch, frames - 1, w + n - 1, A["audio_layers"], A["audio_in_dim"]).astype(np.float32)
    return first, later


def _torch_talk_forward(model, proj, x, y, ctx, clip, t, first, later, text_len):
    """Batch element by element (the official code is batch-1)."""
    outs = []
    for b in range(x.shape[0]):
        with torch.no_grad():
            tok = proj(torch.from_numpy(first[b:b + 1]), torch.from_numpy(later[b:b + 1]))
            tok = torch.concat(tok.split(1), dim=2)         # model_fn_wan_talk_video (svi_video_talk.py L123-124)
        for blk in model.blocks:
            blk._audio, blk._grid = tok, (x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
        outs.append(_torch_forward(model, x[b:b + 1], y[b:b + 1], ctx[b:b + 1], clip[b:b + 1], t[b:b + 1], text_len))
    return np.concatenate(outs)


@pytest.fixture(scope="module")
def talk_ref(tmp_path_factory):
    model = tiny_wan_diffusers(i2v=True, seed=5, num_layers=2, heads=2, head_dim=8, out_channels=4, in_channels=9)
    proj, audio_sd = _attach_audio(model, seed=7)
    d = str(tmp_path_factory.mktemp("talk_official"))
    base = {k: v for k, v in model.state_dict().items()
            if ".audio_cross_attn." not in k and ".norm_x." not in k}
    # _write_official maps diffusers -> official names; it only needs .state_dict()
    _write_official(types.SimpleNamespace(state_dict=lambda: base, config=model.config), d)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in audio_sd.items()}, os.path.join(d, "multitalk.safetensors"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update({k: A[k] for k in ("audio_window", "audio_vae_scale", "audio_layers", "audio_in_dim")})
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return model, proj, audio_sd, d


def test_multitalk_dit_parity_official_layout(talk_ref, tmp_path):
    model, proj, _, src = talk_ref
    s = convert(src, str(tmp_path / "ours"), show_progress=False)   # finds SRC/multitalk.safetensors
    c = s["config"]
    assert c["multitalk"] and c["audio_tokens"] == A["audio_tokens"] and c["audio_dim"] == A["audio_dim"]
    ours = svi_jax.load(str(tmp_path / "ours"))
    x, y, ctx, clip, t = _inputs(True, 2, 3, 4, 6, 9, 4, 20, 7, 20, seed=4)
    first, later = _audio_inputs(2, 3, seed=1)
    ref = _torch_talk_forward(model, proj, x, y, ctx, clip, t, first, later, 512)
    out = np.asarray(ours(x, t, ctx, clip_fea=clip, y=y, audio=(first, later)))
    err = max_rel_err(out, ref)
    print(f"multitalk DiT (batch 2) max rel err {err:.2e}")
    assert err <= TOL
    # the audio branch matters: without audio the output differs (the official skips the branch then)
    no_audio = np.asarray(ours(x, t, ctx, clip_fea=clip, y=y))
    assert max_rel_err(no_audio, ref) > 1e-3


def test_audio_modules_alone_match(talk_ref, tmp_path):
    """AudioProjModel and SingleStreamAttention on their own, with params from the converted checkpoint."""
    import jax.numpy as jnp

    from svi_jax.models.audio import AudioProjModel as JProj, SingleStreamAttention as JAttn

    model, proj, _, src = talk_ref
    convert(src, str(tmp_path / "ours"), show_progress=False)
    ours = svi_jax.load(str(tmp_path / "ours"))
    first, later = _audio_inputs(1, 4, seed=2)
    with torch.no_grad():
        ref_tok = proj(torch.from_numpy(first), torch.from_numpy(later)).numpy()
    tok = JProj(ours.config).apply({"params": ours.params["audio_proj"]}, jnp.asarray(first), jnp.asarray(later))
    assert max_rel_err(tok, ref_tok) <= TOL
    blk = model.blocks[1]
    xs = np.random.RandomState(3).randn(1, 4 * 6, ours.config.dim).astype(np.float32)
    with torch.no_grad():
        ref = blk.audio_cross_attn(torch.from_numpy(xs), torch.from_numpy(ref_tok[0]), (4, 2, 3)).numpy()
    p1 = {k: v[1] for k, v in svi_jax.model_dirs.flatten(ours.params["blocks"]["audio_cross_attn"]).items()}
    out = JAttn(ours.config).apply({"params": svi_jax.model_dirs.unflatten(p1)}, jnp.asarray(xs), jnp.asarray(tok))
    assert max_rel_err(out, ref) <= TOL


def test_multitalk_bad_files_fail_clearly(talk_ref, tmp_path):
    from safetensors.torch import save_file

    _, _, audio_sd, src = talk_ref
    base = str(tmp_path / "base")
    os.makedirs(base)
    for f in os.listdir(src):
        if f != "multitalk.safetensors":
            os.symlink(os.path.join(src, f), os.path.join(base, f))
    missing = {k: v for k, v in audio_sd.items() if k != "blocks.1.norm_x.weight"}
    save_file({k: v.contiguous() for k, v in missing.items()}, str(tmp_path / "m1.safetensors"))
    with pytest.raises(ConversionError, match=r"blocks\.1\.norm_x\.weight"):
        convert(base, str(tmp_path / "o1"), show_progress=False, multitalk=str(tmp_path / "m1.safetensors"))
    bad = dict(audio_sd)
    bad["blocks.0.audio_cross_attn.kv_linear.weight"] = torch.zeros(16, A["audio_dim"] + 1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "m2.safetensors"))
    with pytest.raises(ConversionError, match=r"kv_linear\.weight.*expected"):
        convert(base, str(tmp_path / "o2"), show_progress=False, multitalk=str(tmp_path / "m2.safetensors"))
    with pytest.raises(ConversionError, match="does not exist"):
        convert(base, str(tmp_path / "o3"), show_progress=False, multitalk=str(tmp_path / "nope.safetensors"))
    # without the audio file the base converts as a plain I2V DiT
    s = convert(base, str(tmp_path / "o4"), show_progress=False)
    assert not s["config"]["multitalk"]


def test_audio_layers_with_and_without_remat_agree():
    """The audio branch in the scanned block stack with and without rematerialisation (the training setting):
    same values and gradients."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from svi_jax.models.audio import audio_input_shapes
    from svi_jax.models.dit import DiTConfig, WanDiT, init_params

    cfg = DiTConfig(model_type="i2v", dim=16, num_layers=2, num_heads=2, ffn_dim=24, freq_dim=16, text_dim=8,
                    text_len=8, in_dim=9, out_dim=4, image_dim=8, multitalk=True, **A)
    p = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), p)
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(2, 3, 2, 2, cfg.out_dim), jnp.float32)
    y = jnp.asarray(r.randn(2, 3, 2, 2, cfg.in_dim - cfg.out_dim), jnp.float32)
    ctx = jnp.asarray(r.randn(2, 5, cfg.text_dim), jnp.float32)
    clip = jnp.asarray(r.randn(2, 3, cfg.image_dim), jnp.float32)
    audio = tuple(jnp.asarray(r.randn(*s), jnp.float32) for s in audio_input_shapes(cfg, 3, 2))
    t = jnp.array([10.0, 900.0])
    vals, grads = [], []
    for kw in (dict(), dict(remat_policy="full")):
        c = dataclasses.replace(cfg, **kw)
        m = WanDiT(c)
        v, g = jax.jit(jax.value_and_grad(
            lambda q: jnp.sum(m.apply({"params": q}, x, t, ctx, clip_fea=clip, y=y, audio=audio) ** 2)))(p)
        vals.append(float(v))
        grads.append(np.asarray(g["audio_proj"]["proj1"]["kernel"]))
    np.testing.assert_allclose(vals[1:], vals[:1], rtol=1e-5)
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-4, atol=1e-6)
    assert np.abs(grads[0]).sum() > 0
