"""Run by tests/test_plan.py with 8 fake CPU devices: the trainer's compiled-to-be step and svi_jax.plan's step for
the same small config lower to the same program (StableHLO text without locations). Prints ``OK identical``."""
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
p_text = strip(step.lower(state, abstract_batch).as_text())
assert "loc(" not in p_text and len(p_text) > 10000
if t_text != p_text:
    import difflib

    diff = list(difflib.unified_diff(t_text.splitlines(), p_text.splitlines(), lineterm="", n=1))
    raise SystemExit("the plan's step differs from the trainer's:\n" + "\n".join(diff[:60]))
print("OK identical", len(p_text), flush=True)
