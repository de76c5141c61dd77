"""Shared defaults of every training config: the official SVI settings (``scripts/train/svi_shot.sh``)."""
import ml_collections

from svi_jax.data.config import default_config as data_config
from svi_jax.erft import erft_config
from svi_jax.lora import DEFAULT_TARGETS
from svi_jax.sharding import LOGICAL_RULES


def train_config(model: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = model
    # Converted checkpoints (python convert/from_torch.py ...); '' = random init from train.seed (tiny configs only).
    c.checkpoints = ml_collections.ConfigDict(dict(dit="", vae="", t5="", clip="", tokenizer=""))
    # Architectures of randomly initialised encoders (used only where a checkpoint path is '').
    c.encoders = ml_collections.ConfigDict(dict(vae=ml_collections.ConfigDict(), t5=ml_collections.ConfigDict(),
                                                clip=ml_collections.ConfigDict()))
    # compute dtype of the frozen VAE / UMT5 / CLIP inside the train step: 'float32' (exact) or 'bfloat16' (params
    # cast, about half the time and memory at full size; measured error in docs/train.md)
    c.encoders.dtype = "float32"
    c.data = data_config()
    c.data.videos = ""       # a folder of videos (official layout) -> built into data.dataset on first use
    c.data.dataset = ""      # a built dataset (python -m svi_jax.data build ...); default: <workdir>/dataset
    c.data.cache = ""        # a latent cache (python -m svi_jax.data cache ...): trains on stored tensors
    c.data.synthetic = 0     # > 0: generate this many synthetic clips into <workdir>/videos when data.videos is ''
    c.lora = ml_collections.ConfigDict(dict(rank=128, alpha=128, targets=DEFAULT_TARGETS, dtype="float32",
                                            export_prefix=""))
    # sampling only (python -m svi_jax.sample): output size height/width (0 = from the reference's aspect ratio, see
    # svi_jax/output_size.py), max_width of that rule (0 = data.width: 832 Shot/Film, as the official test_svi.py)
    c.sample = ml_collections.ConfigDict(dict(height=0, width=0, max_width=0))
    c.erft = erft_config()   # official Shot probabilities, 50 grids x 500, warm-up 50
    c.erft.enabled = True
    c.erft.bank_dtype = "bfloat16"
    # banks on a mesh (svi_jax.sharding): 'replica' = one pair per data replica (official), 'global' = one shared
    # pair split over all devices; bank_replicas 0 = the mesh's data-axis size.
    c.erft.bank_mode = "replica"
    c.erft.bank_replicas = 0
    # the paper's Tab. 7 baseline (instead of ERFT): handcrafted degradations of the condition frames with probability
    # handcrafted_p > 0 (colour shift, blur, sharpening at handcrafted_strength; svi_jax/augment.py)
    c.baseline = ml_collections.ConfigDict(dict(handcrafted_p=0.0, handcrafted_strength=1.0))
    # AdamW lr 1e-4 as the official scripts (the paper's table says 2e-5: --config.optim.lr=2e-5).
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant", weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8))
    # trainable: 'lora' (SVI) or 'full' (every DiT weight; e.g. pre-training the drift experiment's tiny base)
    c.train = ml_collections.ConfigDict(dict(num_steps=10000, seed=0, trainable="lora", ckpt_every=500, keep=3,
                                             max_nonfinite=10, export_lora=True, async_checkpoints=True,
                                             # resume: fields allowed to differ from the run's saved config
                                             # (comma-separated, e.g. "optim.lr"; see svi_jax/run_config.py)
                                             allow_changes=""))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    # logical axis name -> mesh axes of every parameter and activation constraint (svi_jax/sharding.py)
    c.sharding = ml_collections.ConfigDict(dict(rules=LOGICAL_RULES))
    return c
