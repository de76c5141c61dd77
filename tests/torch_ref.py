"""Helpers shared by the parity tests: tiny randomised PyTorch reference models and error metrics."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def from_torch_cli(*argv) -> int:
    """Run ``convert/from_torch.py`` (a script, not a module) in this process; returns its exit code."""
    spec = importlib.util.spec_from_file_location("from_torch", os.path.join(ROOT, "convert", "from_torch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in argv])


def max_rel_err(ours, ref) -> float:
    """max |a - b| / max |b| (errors relative to the output's scale)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def randomize_(module, seed: int = 0, scale: float = 0.2):
    """Give every parameter (norm gammas, biases, modulation tables included) random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("weight") and p.ndim == 1:      # norm scales: around 1
                p.copy_(1.0 + scale * noise)
            else:
                fan_in = p.shape[1] if p.ndim >= 2 else 1
                for s in p.shape[2:]:
                    fan_in *= s
                p.copy_(noise * (scale if p.ndim < 2 else max(fan_in, 1) ** -0.5))
    return module


def tiny_wan_diffusers(i2v: bool, seed: int = 0, num_layers: int = 2, heads: int = 2, head_dim: int = 12,
                       in_channels: int | None = None, out_channels: int = 4, text_dim: int = 20, ffn_dim: int = 40,
                       freq_dim: int = 16, image_dim: int = 20, cross_attn_norm: bool = True):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    dim = heads * head_dim
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_channels or (out_channels + 5 if i2v else out_channels), out_channels=out_channels,
        text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
        cross_attn_norm=cross_attn_norm, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=image_dim if i2v else None, added_kv_proj_dim=dim if i2v else None)
    return randomize_(model.eval(), seed)
