"""LoRA files in the shared formats (PEFT/SVI, ComfyUI/kohya, diffusers, full-weight diffs): import == merging the
same B @ A by hand; stacking order and strengths; export round trips; the ComfyUI key names its Wan loader accepts."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from svi_jax import lora_formats as F
from svi_jax.model_dirs import flatten
from svi_jax.lora import LoRAError
from svi_jax.models.dit import DiTConfig, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = DiTConfig(model_type="i2v", dim=24, num_layers=2, num_heads=2, ffn_dim=40, freq_dim=16, text_dim=20, text_len=8,
                in_dim=9, out_dim=4, image_dim=20)
# official module -> (in, out) of its Linear in the tiny model
LINEARS = {"blocks.0.self_attn.q": (24, 24), "blocks.1.cross_attn.o": (24, 24), "blocks.1.ffn.0": (24, 40),
           "blocks.0.ffn.2": (40, 24), "blocks.1.cross_attn.k_img": (24, 24), "text_embedding.0": (20, 24),
           "head.head": (24, 16), "time_projection.1": (24, 144)}


@pytest.fixture(scope="module")
def params():
    def rand(key):
        p = init_params(CFG, key)
        leaves, tree = jax.tree.flatten(p)
        ks = jax.random.split(jax.random.key(7), len(leaves))
        return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])

    return jax.jit(rand)(jax.random.key(0))


def _ab(seed, modules=LINEARS, rank=3):
    rng = np.random.default_rng(seed)
    return {m: (rng.normal(size=(rank, fi)).astype(np.float32), rng.normal(size=(fo, rank)).astype(np.float32))
            for m, (fi, fo) in modules.items()}


def _our_path(module):
    """Official module -> (our kernel path, layer) written out by hand."""
    parts = module.split(".")
    if parts[0] == "blocks":
        return "blocks/" + "/".join(parts[2:]) + "/kernel", int(parts[1])
    return "/".join(parts) + "/kernel", None


def _by_hand(params, stack):
    """W + sum_i s_i * c_i * (B_i @ A_i)^T in float64 (our kernels are [in, out])."""
    flat = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    for ab, s, c in stack:
        for m, (a, b) in ab.items():
            path, layer = _our_path(m)
            d = s * c * (b.astype(np.float64) @ a.astype(np.float64)).T
            if layer is None:
                flat[path] = flat[path] + d
            else:
                flat[path][layer] = flat[path][layer] + d
    return flat


def _close(merged, want):
    got = {k: np.asarray(v, np.float64) for k, v in flatten(merged).items()}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def _diffusers_name(m):
    return {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
            "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj", "blocks.0.ffn.2": "blocks.0.ffn.net.2",
            "blocks.1.cross_attn.k_img": "blocks.1.attn2.add_k_proj",
            "text_embedding.0": "condition_embedder.text_embedder.linear_1", "head.head": "proj_out",
            "time_projection.1": "condition_embedder.time_proj"}[m]


def _write(sd, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("style", ["svi_pipe", "svi_bare", "peft_plain", "comfyui", "comfyui_noalpha", "kohya",
                                   "diffusers"])
def test_each_format_equals_the_merge_by_hand(params, style, tmp_path):
    ab = _ab(1)
    sd, c = {}, 1.0
    for m, (a, b) in ab.items():
        if style == "svi_pipe":
            sd[f"pipe.dit.{m}.lora_A.default.weight"], sd[f"pipe.dit.{m}.lora_B.default.weight"] = a, b
        elif style == "svi_bare":
            sd[f"{m}.lora_A.default.weight"], sd[f"{m}.lora_B.default.weight"] = a, b
        elif style == "peft_plain":
            sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"] = a, b
        elif style in ("comfyui", "comfyui_noalpha"):
            sd[f"diffusion_model.{m}.lora_down.weight"], sd[f"diffusion_model.{m}.lora_up.weight"] = a, b
            if style == "comfyui":
                sd[f"diffusion_model.{m}.alpha"] = np.asarray(1.5, np.float32)      # rank 3 -> scale 0.5
                c = 0.5
        elif style == "kohya":
            k = "lora_unet_" + m.replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = a, b
            sd[f"{k}.alpha"] = np.asarray(6.0, np.float32)                          # scale 2
            c = 2.0
        else:
            d = _diffusers_name(m)
            sd[f"transformer.{d}.lora_A.weight"], sd[f"transformer.{d}.lora_B.weight"] = a, b
    path = _write(sd, tmp_path / "l.safetensors")
    merged = F.merge_stack(params, [F.LoraSpec(path, 0.8)])
    _close(merged, _by_hand(params, [(ab, 0.8, c)]))
    # PATH:STRENGTH and a training workdir holding lora.safetensors
    os.replace(path, tmp_path / "lora.safetensors")
    _close(F.merge_stack(params, [f"{tmp_path}:0.8"]), _by_hand(params, [(ab, 0.8, c)]))


def test_full_weight_diffs(params, tmp_path):
    rng = np.random.default_rng(3)
    ab = _ab(2, {"blocks.0.self_attn.q": (24, 24)})
    d_norm = rng.normal(size=24).astype(np.float32)
    d_bias = rng.normal(size=24).astype(np.float32)
    d_head = rng.normal(size=(16, 24)).astype(np.float32)          # official [out, in]
    d_mod = rng.normal(size=(1, 6, 24)).astype(np.float32)
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": ab["blocks.0.self_attn.q"][0],
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": ab["blocks.0.self_attn.q"][1],
          "diffusion_model.blocks.1.norm3.diff": d_norm, "diffusion_model.blocks.0.cross_attn.o.diff_b": d_bias,
          "diffusion_model.head.head.diff": d_head, "diffusion_model.blocks.1.modulation.diff": d_mod,
          "diffusion_model.blocks.0.self_attn.q.diff_b": d_bias}
    merged = F.merge_stack(params, [(sd, 0.5)])
    want = _by_hand(params, [(ab, 0.5, 1.0)])
    want["blocks/norm3/scale"][1] += 0.5 * d_norm
    want["blocks/cross_attn/o/bias"][0] += 0.5 * d_bias
    want["blocks/self_attn/q/bias"][0] += 0.5 * d_bias
    want["head/head/kernel"] += 0.5 * d_head.T
    want["blocks/modulation"][1] += 0.5 * d_mod
    _close(merged, want)


def test_stacking_order_and_strengths(params, tmp_path):
    ab1, ab2 = _ab(4), _ab(5, {"blocks.0.self_attn.q": (24, 24), "blocks.1.ffn.0": (24, 40)}, rank=2)
    sd1 = {f"{m}.lora_A.default.weight": a for m, (a, b) in ab1.items()}
    sd1.update({f"{m}.lora_B.default.weight": b for m, (a, b) in ab1.items()})
    sd2 = {f"diffusion_model.{m}.lora_down.weight": a for m, (a, b) in ab2.items()}
    sd2.update({f"diffusion_model.{m}.lora_up.weight": b for m, (a, b) in ab2.items()})
    sd2.update({f"diffusion_model.{m}.alpha": np.asarray(4.0, np.float32) for m in ab2})   # rank 2: scale 2
    p1, p2 = _write(sd1, tmp_path / "a.safetensors"), _write(sd2, tmp_path / "b.safetensors")
    want = _by_hand(params, [(ab1, 1.0, 1.0), (ab2, -0.35, 2.0)])
    _close(F.merge_stack(params, [p1, f"{p2}:-0.35"]), want)
    _close(F.merge_stack(params, [f"{p2}:-0.35", p1]), want)           # the sum does not depend on the order...
    one = F.merge_stack(F.merge_stack(params, [p1]), [f"{p2}:-0.35"])   # ...nor on merging one file at a time
    _close(one, want)
    # strength 0 is the base; a strength scales linearly
    _close(F.merge_stack(params, [f"{p1}:0"]), _by_hand(params, []))
    _close(F.merge_stack(params, [f"{p1}:2.5"]), _by_hand(params, [(ab1, 2.5, 1.0)]))
    # the stack is merged in the listed order: the same file twice at 0.5 == once at 1
    _close(F.merge_stack(params, [f"{p1}:0.5", f"{p1}:0.5"]), _by_hand(params, [(ab1, 1.0, 1.0)]))


def test_bf16_params_merge_in_float32_and_cast_once(params, tmp_path):
    import jax.numpy as jnp

    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ab = _ab(6, {"blocks.0.ffn.2": (40, 24)})
    sd = {"blocks.0.ffn.2.lora_A.weight": ab["blocks.0.ffn.2"][0], "blocks.0.ffn.2.lora_B.weight": ab["blocks.0.ffn.2"][1]}
    merged = F.merge_stack(p16, [(sd, 0.01), (sd, 0.01)])
    w = np.asarray(flatten(p16)["blocks/ffn/2/kernel"][0], np.float32)
    want = (w + 0.02 * (ab["blocks.0.ffn.2"][1] @ ab["blocks.0.ffn.2"][0]).T).astype(jnp.bfloat16)
    got = flatten(merged)["blocks/ffn/2/kernel"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want, np.float32))


def test_specs():
    assert F.parse_spec("a/b.safetensors") == F.LoraSpec("a/b.safetensors", 1.0)
    assert F.parse_spec("a/b.safetensors:0.5") == F.LoraSpec("a/b.safetensors", 0.5)
    assert F.parse_spec("a/b.safetensors:-1e-1") == F.LoraSpec("a/b.safetensors", -0.1)
    assert F.parse_spec("c:/x/y.safetensors", 0.7) == F.LoraSpec("c:/x/y.safetensors", 0.7)   # not a number
    assert F.parse_specs(["x:2", {"path": "y", "strength": 3}], 0.4) == [F.LoraSpec("x", 2.0), F.LoraSpec("y", 3.0)]
    assert F.parse_specs("z", 0.4) == [F.LoraSpec("z", 0.4)] and F.parse_specs(None) == []
    with pytest.raises(LoRAError, match="empty"):
        F.parse_spec(" ")


@pytest.mark.parametrize("sd, msg", [
    ({"blocks.0.self_attn.q.lora_A.weight": np.ones((2, 24)), "blocks.0.self_attn.q.lora_B.weight": np.ones((24, 2)),
      "blocks.0.self_attn.q.foo": np.ones(2)}, "unknown key 'blocks.0.self_attn.q.foo'"),
    ({"blocks.5.self_attn.q.lora_A.weight": np.ones((2, 24)), "blocks.5.self_attn.q.lora_B.weight": np.ones((24, 2))},
     "unknown key 'blocks.5.self_attn.q.lora_A.weight'.*lacks"),
    ({"diffusion_model.blocks.0.self_attn.zz.lora_down.weight": np.ones((2, 24)),
      "diffusion_model.blocks.0.self_attn.zz.lora_up.weight": np.ones((24, 2))}, "self_attn.zz"),
    ({"lora_unet_blocks_0_self_attn_zz.lora_down.weight": np.ones((2, 24)),
      "lora_unet_blocks_0_self_attn_zz.lora_up.weight": np.ones((24, 2))}, "lora_unet_blocks_0_self_attn_zz"),
    ({"blocks.0.self_attn.q.lora_A.weight": np.ones((2, 24)), "blocks.0.self_attn.q.lora_B.weight": np.ones((24, 3))},
     "rank mismatch in 'blocks.0.self_attn.q.lora_A.weight'"),
    ({"blocks.0.ffn.0.lora_A.weight": np.ones((2, 40)), "blocks.0.ffn.0.lora_B.weight": np.ones((24, 2))},
     "do not fit 'blocks.0.ffn.0'"),
    ({"blocks.0.self_attn.q.lora_A.weight": np.ones((2, 24))}, "has no matching up"),
    ({"blocks.0.norm3.lora_down.weight": np.ones((2, 24)), "blocks.0.norm3.lora_up.weight": np.ones((24, 2))},
     "not a Linear"),
    ({"diffusion_model.blocks.0.norm3.diff": np.ones(23)}, "diff 'diffusion_model.blocks.0.norm3.diff' has shape"),
    ({"diffusion_model.blocks.0.norm1.diff": np.ones(24)}, "norm1"),
])
def test_bad_files_name_the_key(params, sd, msg):
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    with pytest.raises(LoRAError, match=msg):
        F.merge_stack(params, [(sd, 1.0)])


# ------------------------------------------------------------------------------------------------ export


def _svi_file(tmp_path, ab):
    sd = {f"{m}.lora_A.default.weight": a for m, (a, b) in ab.items()}
    sd.update({f"{m}.lora_B.default.weight": b for m, (a, b) in ab.items()})
    sd["blocks.1.norm3.diff"] = np.arange(24, dtype=np.float32) / 10
    sd["blocks.0.cross_attn.o.diff_b"] = -np.arange(24, dtype=np.float32) / 7
    return sd


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_export_round_trips_exactly(params, fmt, tmp_path):
    ab = _ab(8)
    sd = _svi_file(tmp_path, ab)
    out = F.write(sd, str(tmp_path / f"{fmt}.safetensors"), fmt)
    back = F.read(str(tmp_path / f"{fmt}.safetensors"))
    assert set(back) == set(out)
    # the same modules and parts, bit for bit
    g0, g1 = F.group(sd), F.group(back)
    assert set(g0) == set(g1)
    for m in g0:
        for part in ("down", "up", "diff", "diff_b"):
            if part in g0[m]:
                np.testing.assert_array_equal(g1[m][part][1], g0[m][part][1])
    # and back to svi from it: identical to the original file
    again = F.write(back, str(tmp_path / "again.safetensors"), "svi")
    assert set(again) == set(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)
    # merging either gives the same weights
    _close(F.merge_stack(params, [(back, 0.7)]), {k: np.asarray(v, np.float64) for k, v in
                                                  flatten(F.merge_stack(params, [(sd, 0.7)])).items()})
    if fmt == "comfyui":
        assert all(k.startswith("diffusion_model.") for k in out)
        assert out["diffusion_model.blocks.0.self_attn.q.alpha"] == 3.0
    if fmt == "diffusers":
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in out
        assert "transformer.blocks.1.norm2.diff" in out                  # Wan's norm3 is diffusers' norm2
        assert "transformer.condition_embedder.text_embedder.linear_1.lora_B.weight" in out


def test_export_folds_alpha(params, tmp_path):
    ab = _ab(9, {"blocks.0.ffn.2": (40, 24)})
    a, b = ab["blocks.0.ffn.2"]
    sd = {"diffusion_model.blocks.0.ffn.2.lora_down.weight": a, "diffusion_model.blocks.0.ffn.2.lora_up.weight": b,
          "diffusion_model.blocks.0.ffn.2.alpha": np.asarray(12.0, np.float32)}            # rank 3: scale 4
    out = F.write(sd, str(tmp_path / "x.safetensors"), "svi")
    np.testing.assert_array_equal(out["blocks.0.ffn.2.lora_B.default.weight"], (b.astype(np.float64) * 4).astype(np.float32))
    _close(F.merge_stack(params, [(out, 1.0)]), _by_hand(params, [(ab, 1.0, 4.0)]))


def test_diffusers_names_invert_the_converter(params):
    from svi_jax.convert.dit import diffusers_to_official

    table = F.ModuleTable(params)
    for key in table.keys:
        mod, leaf = (key[:-len(".weight")], ".weight") if key.endswith(".weight") else \
            (key[:-len(".bias")], ".bias") if key.endswith(".bias") else (key, "")
        if leaf:
            assert diffusers_to_official(F.official_to_diffusers(mod) + leaf) == key, key


# ------------------------------------------------------------------------------------------------ ComfyUI


def comfy_unet_key_map(model_keys):
    """Transcribed from ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (Comfy-Org/ComfyUI @17358c8, the first loop,
    the part that applies to Wan / ``WAN21``, which has no model-specific branch there):

        for k in sdk:
            if k.startswith("diffusion_model."):
                if k.endswith(".weight"):
                    key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                    key_map["lora_unet_{}".format(key_lora)] = k
                    key_map["{}".format(k[:-len(".weight")])] = k   # generic lora format
                else:
                    key_map["{}".format(k)] = k                       # generic lora format for not .weight
    """
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map["{}".format(k)] = k
    return key_map


def comfy_load_lora(lora, to_load):
    """Transcribed from ComfyUI ``comfy/lora.py`` ``load_lora`` (comfyanonymous/ComfyUI @00728eb: ``{x}.alpha``,
    ``regular_lora = "{x}.lora_up.weight"`` / ``"{x}.lora_down.weight"``, ``"{x}.diff"``, ``"{x}.diff_b"`` -> the
    ``.bias`` of ``to_load[x]``; newer versions move the up/down lookup to ``comfy/weight_adapter/lora.py``
    ``LoRAAdapter.load``, same names) -- the keys it consumes, and the patches (target -> kind) it makes."""
    patch, loaded = {}, set()
    for x in to_load:
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = float(lora[f"{x}.alpha"])
            loaded.add(f"{x}.alpha")
        if f"{x}.lora_up.weight" in lora:
            patch[to_load[x]] = ("lora", lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"], alpha)
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
        if f"{x}.diff" in lora:
            patch[to_load[x]] = ("diff", lora[f"{x}.diff"])
            loaded.add(f"{x}.diff")
        if f"{x}.diff_b" in lora:
            patch["{}.bias".format(to_load[x][:-len(".weight")])] = ("diff", lora[f"{x}.diff_b"])
            loaded.add(f"{x}.diff_b")
    not_loaded = [k for k in lora if k not in loaded]          # ComfyUI logs "lora key not loaded: ..."
    return patch, not_loaded


def test_comfyui_export_loads_in_comfyuis_wan_key_mapping(params, tmp_path):
    """Every key of our ComfyUI export is consumed by ComfyUI's loader for a Wan model (whose state dict is the
    official Wan names under ``diffusion_model.``), and its patches rebuild exactly our merge."""
    from svi_jax.convert.dit import to_official

    table = F.ModuleTable(params)
    model_sd = {"diffusion_model." + k: np.asarray(to_official(np.asarray(
        flatten(params)[p][i] if i is not None else flatten(params)[p]), how), np.float64)
        for k, (p, i, how) in table.keys.items()}
    ab = _ab(10)
    sd = _svi_file(tmp_path, ab)
    out = F.write(sd, str(tmp_path / "c.safetensors"), "comfyui")
    patches, not_loaded = comfy_load_lora(out, comfy_unet_key_map(model_sd))
    assert not_loaded == []
    # ComfyUI's calculate_weight: W += strength * (alpha / rank) * up @ down; diff: W += strength * diff
    s = 0.6
    for target, p in patches.items():
        if p[0] == "lora":
            up, down, alpha = p[1], p[2], p[3]
            model_sd[target] = model_sd[target] + s * (alpha / down.shape[0]) * (up.astype(np.float64) @ down)
        else:
            model_sd[target] = model_sd[target] + s * p[1]
    ours = flatten(F.merge_stack(params, [(sd, s)]))
    for k, (p, i, how) in table.keys.items():
        mine = np.asarray(ours[p][i] if i is not None else ours[p], np.float64)
        np.testing.assert_allclose(to_official(mine, how), model_sd["diffusion_model." + k], rtol=1e-5, atol=1e-5,
                                   err_msg=k)


def _from_torch(*argv, capsys=None) -> int:
    import importlib.util

    from svi_jax import cli

    spec = importlib.util.spec_from_file_location("from_torch", os.path.join(ROOT, "convert", "from_torch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return cli.run(mod.main, [str(a) for a in argv])


def test_lora_export_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ab = _ab(11)
    from safetensors.numpy import save_file

    sd = {f"{m}.lora_A.default.weight": a for m, (a, b) in ab.items()}
    sd.update({f"{m}.lora_B.default.weight": b for m, (a, b) in ab.items()})
    save_file(sd, str(run / "lora.safetensors"))
    assert _from_torch("lora-export", "--src", run, "--format", "comfyui") == 0
    out = F.read(str(run / "lora_comfyui.safetensors"))
    assert set(out) == {f"diffusion_model.{m}.{p}" for m in ab for p in ("lora_down.weight", "lora_up.weight",
                                                                            "alpha")}
    assert _from_torch("lora-export", "--src", run) == 0                # default: the SVI format
    svi = F.read(str(run / "lora_svi.safetensors"))
    assert set(svi) == set(sd) and all(np.array_equal(svi[k], sd[k]) for k in sd)
    assert _from_torch("lora-export", "--src", run / "lora_comfyui.safetensors", "--format", "diffusers",
                       "--dst", tmp_path / "d.safetensors") == 0
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in F.read(str(tmp_path / "d.safetensors"))
    capsys.readouterr()
    assert _from_torch("lora-export", "--src", tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and err.count("\n") == 1
