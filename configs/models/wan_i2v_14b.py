"""Wan2.1-I2V-14B-480P DiT (the SVI base model)."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        model_type="i2v", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, freq_dim=256, text_dim=4096,
        text_len=512, in_dim=36, out_dim=16, patch_size=(1, 2, 2), eps=1e-6, qk_norm=True, cross_attn_norm=True,
        image_dim=1280, rope_max_seq_len=1024, rope_theta=10000.0, param_dtype="bfloat16", dtype="bfloat16",
        attention="auto", remat_policy="full", scan_layers=True, lora_scale=1.0))
