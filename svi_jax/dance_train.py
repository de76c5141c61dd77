"""SVI-Dance training pieces, called from the generic train step (``svi_jax.train``) when the model config has
``pose_embedding``; everything here is a no-op otherwise.

As ``train_svi_dance.py``:

* both the LoRA and ``dwpose_embedding`` are trained (optimizer L1272-1276), initialised from
  ``config.dance.adapter`` (``--pretrained_lora_path UniAnimate-Wan2.1-14B-Lora-12000.ckpt``, L985-1014; its B
  divided by ``alpha / rank``, so the run starts from the adapter's model for any alpha). Here the
  trained pose module rides in the ``lora`` collection under ``dwpose_embedding`` (one trainable tree, one
  optimizer state, one checkpoint entry) and is moved into ``params`` for the forward pass;
* the pose condition -- the embedding's *output* -- is zeroed when either of two independent draws hits
  (``p1 < 0.05``, ``p2 < 0.1``: 0.145 in all, L1055-1060);
* CLIP features and y are zeroed together with p 0.1 (one draw, L1062-1075); such a step injects no y error
  (``y_set_null``, L1146);
* the exported file is the official SVI-Dance layout (``pipe.dit.`` LoRA + ``dwpose_embedding.*``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POSE = "dwpose_embedding"


def enabled(config) -> bool:
    return bool(config.model.get("pose_embedding", False))


def with_pose_params(cfg, params: dict, key) -> dict:
    """A base DiT checkpoint (no pose module) gets a seeded pose module, so its tree matches the dance model's
    (the trained one comes from ``config.dance.adapter``)."""
    if not cfg.pose_embedding or POSE in params:
        return params
    from flax.linen import meta

    from svi_jax.models.pose import PoseEmbedding, init_pose

    emb = PoseEmbedding(cfg.dim, cfg.dtype, cfg.param_dtype)          # the pose module alone, never the 14B DiT
    return dict(params, **{POSE: meta.unbox(jax.jit(lambda k: emb.init(k, init_pose(cfg.dim)))(key)["params"])})


def init_trainable(config, dit_params: dict, lora: dict) -> dict:
    """The ``lora`` collection of a dance run: the LoRA (and pose module) from ``config.dance.adapter`` or fresh."""
    from svi_jax.models.layers import dtype_of

    adapter = config.get("dance", {}).get("adapter", "")
    pose = dit_params[POSE]
    if adapter:
        from svi_jax.convert.dance import load_adapter
        from svi_jax.errors import ConfigError

        lora_a, pose, info = load_adapter(adapter, dit_params)
        if info["rank"] != int(config.lora.rank):
            raise ConfigError(f"config.lora.rank = {config.lora.rank} but the adapter {adapter} has rank "
                              f"{info['rank']}")
        dt = dtype_of(config.lora.dtype)
        # the file is the model W + B @ A (strength 1); training computes x W + s (x A) B with s = alpha / rank:
        # B / s starts the run from the adapter's model, and the export (B * s) gives the file back
        lora = jax.tree.map(lambda a: jnp.asarray(a, dt),
                            fold_scale(lora_a, float(config.lora.rank) / float(config.lora.alpha)))
    return {**lora, POSE: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pose)}


def split_trainable(lora: dict) -> tuple[dict, dict | None]:
    """``(LoRA tree, pose params or None)`` of a ``lora`` collection."""
    if POSE not in lora:
        return lora, None
    return {k: v for k, v in lora.items() if k != POSE}, lora[POSE]


def forward_variables(variables: dict) -> dict:
    """Move a trained pose module from the ``lora`` collection into ``params`` for ``WanDiT.apply``."""
    lora = variables.get("lora")
    if lora is None or POSE not in lora:
        return variables
    rest, pose = split_trainable(lora)
    return {"params": {**variables["params"], POSE: pose}, "lora": rest}


def condition(config, inputs: dict, key):
    """``(extra, y, clip_fea, y_null)`` with the official condition dropout; ``(None, y, clip, None)`` without a
    pose model."""
    y, clip = inputs.get("y"), inputs.get("clip_fea")
    if not enabled(config):
        return None, y, clip, None
    if "pose" not in inputs:
        raise ValueError("the model has a pose embedding but the batch has no pose frames: build the dataset from "
                         "videos with skeletons (python -m svi_jax.data pose) so each clip.mp4 has a clip.pose.mp4")
    d = config.dance
    b = inputs["x0"].shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    p1, p2 = (float(p) for p in d.p_pose_zero)
    keep = (jax.random.uniform(k1, (b,)) >= p1) & (jax.random.uniform(k2, (b,)) >= p2)
    y_null = jax.random.uniform(k3, (b,)) < float(d.p_image_zero)
    if y is not None:
        y = jnp.where(y_null[:, None, None, None, None], 0.0, y)
    if clip is not None:
        clip = jnp.where(y_null[:, None, None], 0.0, clip)
    return {"pose": inputs["pose"], "pose_keep": keep.astype(jnp.float32)}, y, clip, y_null


def suppress_y_error(y_in, y_null):
    """No y error on a step whose y was zeroed (official ``not y_set_null``)."""
    if y_null is None or y_in is None:
        return y_in
    return jnp.where(y_null[:, None, None, None, None], 0.0, y_in)


def fold_scale(lora_collection: dict, scale: float) -> dict:
    """The collection with the training scale ``alpha / rank`` folded into every LoRA ``b`` (the file format has no
    alpha; the official merge is ``W += B @ A`` at strength 1). The pose module is left as it is. ``rank / alpha``
    undoes it (an adapter file read into a run, :func:`init_trainable`)."""
    if scale == 1.0:
        return lora_collection
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.device_get(lora_collection))
    return traverse_util.unflatten_dict({k: (v * scale if k[-1] == "b" and POSE not in k else v)
                                         for k, v in flat.items()})


def export(lora_collection: dict, path: str) -> str:
    """The trained LoRA + pose module as an SVI-Dance ``.safetensors`` (official names)."""
    from svi_jax.convert.dance import export_file

    lora, pose = split_trainable(lora_collection)
    export_file(lora, pose, path)
    return path
