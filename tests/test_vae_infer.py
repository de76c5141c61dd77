"""The VAE converter reads every dimension of an official-layout Wan2.1_VAE.pth from its tensors, for any
architecture (issue 19): random params of several configs -> the official layout (our key map, checked against
diffusers' converter in tests/test_vae.py) -> .pth -> convert without a config -> the same config and params."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from svi_jax.model_dirs import flatten  # noqa: E402
from svi_jax.convert import vae as conv  # noqa: E402
from svi_jax.convert.common import ConversionError  # noqa: E402
from svi_jax.models.vae import VAEConfig, param_shapes  # noqa: E402

ARCHS = [
    dict(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=2, temperal_downsample=(False, True, True)),
    dict(base_dim=8, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,)),
    dict(base_dim=4, dim_mult=(1, 1, 3), num_res_blocks=3, temperal_downsample=(True, False)),
    dict(base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
         temperal_downsample=(False, True, True)),
]


def _official_file(tmp_path, cfg: VAEConfig, seed=0):
    rng = np.random.default_rng(seed)
    ours = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in flatten(param_shapes(cfg)).items()}
    omap = conv.official_key_map(cfg)
    sd = {omap[conv.diffusers_key(k)]: torch.from_numpy(np.ascontiguousarray(conv.to_torch(v, k)))
          for k, v in ours.items()}
    path = str(tmp_path / "Wan2.1_VAE.pth")
    torch.save(sd, path)
    return path, ours


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"b{a['base_dim']}_m{''.join(map(str, a['dim_mult']))}"
                         f"_r{a['num_res_blocks']}")
def test_official_pth_of_any_architecture_converts(tmp_path, arch):
    cfg = VAEConfig(z_dim=16, **arch)
    path, ours = _official_file(tmp_path, cfg)
    got_cfg, params, layout = conv.convert(path, show_progress=False)
    assert layout == "official"
    assert got_cfg.arch_dict() == cfg.arch_dict()
    got = flatten(params)
    assert set(got) == set(ours)
    for k, v in ours.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_other_z_dim_needs_a_config_and_a_config_beside_is_used(tmp_path):
    cfg = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,),
                    latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    path, _ = _official_file(tmp_path, cfg)
    with pytest.raises(ConversionError, match="the tensors give z_dim 4: pass --config"):
        conv.convert(path, show_progress=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg.arch_dict()))
    got_cfg, _, _ = conv.convert(path, show_progress=False)
    assert got_cfg.arch_dict() == cfg.arch_dict()
