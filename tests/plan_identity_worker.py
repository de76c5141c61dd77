"""Run by tests/test_plan.py with 8 fake CPU devices: the trainer's compiled-to-be step and svi_jax.plan's step for
the same small config lower to the same program (StableHLO text without locations), with latent inputs (a latent
cache) and with pixel inputs (the frozen encoders' program, then the DiT step: both compared). Prints
``OK identical``."""
import os
import sys
import tempfile

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "run via tests/test_plan.py"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from svi_jax import plan, train  # noqa: E402
from svi_jax.conditioners import LatentConditioner  # noqa: E402
from tests.hlo_text import strip  # noqa: E402

assert jax.device_count() == 8


def small_config():
    config = plan.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "shot.py"), [
        "model.num_layers=2", "model.dim=64", "model.num_heads=2", "model.ffn_dim=128", "model.text_dim=32",
        "model.text_len=16", "model.image_dim=32", "data.num_frames=9", "data.height=32", "data.width=32",
        "lora.rank=4", "erft.capacity=4"])
    config.checkpoints.dit = ""
    config.mesh.update({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
    config.erft.bank_replicas = 2
    return config


def tiny_encoders(config):
    """Tiny Wan VAE / UMT5 / CLIP (the architectures the trainer initialises at random and the plan takes the shapes
    of), so that the pixel step (encoders inside) is the one compared."""
    import ml_collections

    config.encoders.vae = ml_collections.ConfigDict(dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                                                         num_res_blocks=1, temperal_downsample=[False, True, True]))
    config.encoders.t5 = ml_collections.ConfigDict(dict(vocab_size=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                                                        num_layers=2, num_buckets=8, max_distance=16, text_len=16))
    config.encoders.clip = ml_collections.ConfigDict(dict(image_size=28, patch_size=14, dim=32, mlp_dim=64,
                                                          num_heads=2, num_layers=2))
    return config


def compare(t_text, p_text, what):
    assert "loc(" not in p_text and len(p_text) > 10000
    if t_text != p_text:
        import difflib

        diff = list(difflib.unified_diff(t_text.splitlines(), p_text.splitlines(), lineterm="", n=1))
        raise SystemExit(f"the plan's {what} step differs from the trainer's:\n" + "\n".join(diff[:60]))
    print(f"OK identical {what}", len(p_text), flush=True)


# 1. latent inputs (a latent cache): the DiT step alone
config = small_config()
F, H, W, C = train.latent_shape(config)
batch = {"latents": np.zeros((4, F, H, W, C), np.float32), "context": np.zeros((4, 16, 32), np.float32),
         "y": np.zeros((4, F, H, W, C + 4), np.float32), "clip_fea": np.zeros((4, 257, 32), np.float32)}
with tempfile.TemporaryDirectory() as d:
    trainer = train.Trainer(config, d, data=iter(()), conditioner=LatentConditioner(config))
    jax.clear_caches()  # function de-duplication in the text depends on what was traced before
    t_text = strip(trainer.step_fn.lower(trainer.state, trainer.device_batch(batch)).as_text())
    trainer.close()

step, state, abstract_batch, _ = plan.build_step(small_config(), jax.devices(), dict(config.mesh), 4)
jax.clear_caches()
compare(t_text, strip(step.lower(state, abstract_batch).as_text()), "latents")

# 2. pixel inputs: the trainer's default conditioner (frozen encoders inside the step) vs the plan's abstract ones
config = tiny_encoders(small_config())
d_ = config.data
batch = {"video": np.zeros((4, d_.num_frames, d_.height, d_.width, 3), np.float32),
         "cond": np.zeros((4, d_.num_frames, d_.height, d_.width, 3), np.float32),
         "first_frame": np.zeros((4, d_.height, d_.width, 3), np.float32),
         "caption": np.array(["a", "b", "c", "d"], dtype=object)}
with tempfile.TemporaryDirectory() as d:
    trainer = train.Trainer(config, d, data=iter(()))
    db = trainer.device_batch(batch)
    jax.clear_caches()
    t_text = strip(trainer.step_fn.lower(trainer.state, db).as_text())
    jax.clear_caches()
    t_enc = strip(trainer.step_fn.lower_encode(trainer.state, db).as_text())
    trainer.close()

step, state, abstract_batch, _ = plan.build_step(tiny_encoders(small_config()), jax.devices(), dict(config.mesh), 4,
                                                 inputs="config")
jax.clear_caches()
compare(t_text, strip(step.lower(state, abstract_batch).as_text()), "pixels (DiT)")
jax.clear_caches()
compare(t_enc, strip(step.lower_encode(state, abstract_batch).as_text()), "pixels (encoders)")
print("OK identical", flush=True)
