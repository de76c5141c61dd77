"""Run by tests/test_plan.py with 4 fake CPU devices: ``python -m svi_jax.plan --sample``'s program and the program
``python -m svi_jax.sample`` compiles for a clip (``LongVideoSampler.compile``, default mesh: CFG over data,
tokens over context) lower to the same StableHLO (without locations). Prints ``OK identical``."""
import os
import sys

assert "xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", ""), "run via tests/test_plan.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from svi_jax import plan, sample_plan  # noqa: E402
from svi_jax.data import scroll  # noqa: E402
from svi_jax.sample import LongVideoSampler  # noqa: E402
from tests.hlo_text import strip  # noqa: E402

assert jax.device_count() == 4
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
config = plan.load_config(CONFIG, [])
steps, cfg_scale = 3, float(config.get("sample", {}).get("cfg_scale", 5.0))

# the user's sampler, as the CLI builds it (mesh '' = every local device)
sampler = LongVideoSampler(config, num_steps=steps, shift=float(config.erft.shift), cfg_scale=cfg_scale,
                           motion_frames=1, pad="ref", mesh="")
ref = scroll.heldout_specs()[0].frame0(config.data.height, config.data.width)
y, clip_fea = sampler.conditioning(sampler.initial_state(ref), ref)[:2]
jax.clear_caches()
u_text = strip(sampler.sample_fn.lower(*sampler._sample_args("a prompt", y, clip_fea, 0)).as_text())

ms, example, cfg, _ = sample_plan.build(config, jax.devices(), None, steps, cfg_scale)
jax.clear_caches()
p_text = strip(ms._build(example).lower(*example).as_text())
assert "loc(" not in p_text and len(p_text) > 5000
if u_text != p_text:
    import difflib

    diff = list(difflib.unified_diff(u_text.splitlines(), p_text.splitlines(), lineterm="", n=1))
    raise SystemExit("the plan's sampler differs from the user's:\n" + "\n".join(diff[:60]))
print("OK identical", len(p_text), flush=True)
