"""The pure train step ``(TrainState, batch) -> (TrainState, metrics)``.

(encode pixels with the frozen VAE/UMT5/CLIP, or take cached latents) -> flow-matching noise at shift 5 with the
official timestep sampling and loss weighting -> ERFT error injection -> DiT forward with the LoRA collection ->
weighted MSE -> grads w.r.t. the trainable part only -> clip -> AdamW -> error curation -> bank inserts. A
non-finite loss or gradient skips the update (counted); ``train.max_nonfinite`` in a row stops the run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from svi_jax import dance_train, flow
from svi_jax.erft import sharded as erft_sharded
from svi_jax.models.dit import DiTConfig, WanDiT
from svi_jax.models.layers import dtype_of
from svi_jax.train.config import make_optimizer


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def step_keys(rng):
    """The step's keys from ``state.rng``: ``(next rng, t, eps, inject, curate, prepare)``. The encoders' program
    (:func:`make_encode`) takes the same ``prepare`` key, so encoding outside the step changes no random draw."""
    return jax.random.split(rng, 6)


def identity_prepare(params, batch, key):
    """``prepare`` for batches that already are model inputs (cached latents, or the encoders' program's output)."""
    del params, key
    return batch


def make_encode(prepare: Callable[[Any, dict, jax.Array], dict]):
    """The frozen encoders as a program of their own: ``(encoder params, batch, state.rng) -> model inputs``, with
    the step's own ``prepare`` key (:func:`step_keys`). Run before the DiT step (:class:`svi_jax.train.TrainStep`),
    so the two never hold their temporaries at once."""
    def encode(params, batch, rng):
        return jax.lax.stop_gradient(prepare(params, batch, step_keys(rng)[5]))

    return encode


def make_train_step(config, prepare: Callable[[Any, dict, jax.Array], dict]):
    """The pure train step ``(state, batch) -> (state, metrics)``; returns ``(step, module, tx)``.

    ``prepare(params, batch, key)`` turns a batch into model inputs ``{x0, y, context, clip_fea}`` (frozen, no
    gradient): the identity for cached latents or for inputs already encoded by :func:`make_encode` (what the
    trainer does with pixel batches), or the VAE/UMT5/CLIP encoders themselves, inside the step.
    """
    dit_cfg = dataclasses.replace(DiTConfig.from_dict(config.model.to_dict()),
                                  lora_scale=config.lora.alpha / config.lora.rank)
    module = WanDiT(dit_cfg)
    tx = make_optimizer(config)
    shift = float(config.erft.shift)
    sig_tab = jnp.asarray(flow.sigmas(flow.NUM_TRAIN_TIMESTEPS, shift))
    t_tab = jnp.asarray(flow.timesteps(flow.NUM_TRAIN_TIMESTEPS, shift))
    w_tab = jnp.asarray(flow.training_weights(shift))
    from svi_jax.pro_train import timestep_id_range   # (0, 1000), or one Wan2.2 expert's side (config.pro)

    tid_lo, tid_hi = timestep_id_range(config, shift)
    use_erft = bool(config.erft.enabled)
    cap = int(config.erft.capacity)
    p_drop_audio = float(config.get("talk", {}).get("p_drop_audio", 0.0))

    def step(state, batch):
        rng, k_t, k_eps, k_inj, k_cur, k_prep = step_keys(state.rng)
        inputs = jax.lax.stop_gradient(prepare(state.params, batch, k_prep))
        x0, ctx = inputs["x0"], inputs["context"]
        # extra condition streams and their dropout (SVI-Dance: pose; a no-op for other models)
        extra, y, clip, y_null = dance_train.condition(config, inputs, jax.random.fold_in(k_prep, 7))
        audio = inputs.get("audio")                       # SVI-Talk audio windows, dropped with p_drop_audio
        if audio is not None and p_drop_audio > 0:
            from svi_jax.talk_data import drop_audio

            audio = drop_audio(jax.random.fold_in(k_prep, 1), audio, p_drop_audio)
        b = x0.shape[0]
        tid = jax.random.randint(k_t, (b,), tid_lo, tid_hi)
        sigma, t, w = sig_tab[tid], t_tab[tid], w_tab[tid]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        if use_erft:  # erft.inject/curate for one bank or per-replica banks (svi_jax.erft.sharded)
            x_t, target, y_in, info = erft_sharded.inject(k_inj, state.banks, x0, y, eps, t, sigma, config.erft)
        else:
            x_t, target, y_in = flow.add_noise(x0, eps, sigma), flow.velocity_target(x0, eps), y
            info = {}
        y_in = dance_train.suppress_y_error(y_in, y_null)
        cdt = dtype_of(dit_cfg.dtype)

        def loss_fn(trainable):
            v = module.apply(dance_train.forward_variables(state.variables(trainable)), x_t.astype(cdt), t,
                             ctx.astype(cdt), clip_fea=None if clip is None else clip.astype(cdt),
                             y=None if y_in is None else y_in.astype(cdt), extra=extra,
                             audio=None if audio is None else tuple(a.astype(cdt) for a in audio))
            per_example = jnp.mean(jnp.square(v - target.astype(jnp.float32)), axis=tuple(range(1, v.ndim)))
            return jnp.mean(per_example * w), v

        trainable = state.trainable
        (loss, v_pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_new = tx.update(grads, state.opt, trainable)
        banks = state.banks
        if use_erft:
            # a cond, not a select: a skipped step keeps the banks without copying them (in place when donated)
            banks = jax.lax.cond(
                ok, lambda banks: erft_sharded.curate(k_cur, banks, t, sigma, v_pred, target, info, state.step,
                                                      config.erft),
                lambda banks: banks, state.banks)
        nonfinite_run = jnp.where(ok, 0, state.nonfinite_run + 1)
        new = state.replace(trainable=_tree_where(ok, optax.apply_updates(trainable, updates), trainable),
                            opt=_tree_where(ok, opt_new, state.opt), banks=banks, rng=rng, step=state.step + 1,
                            nonfinite_run=nonfinite_run,
                            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": (~ok).astype(jnp.float32),
                   "t_mean": jnp.mean(t), "nonfinite_run": nonfinite_run}
        if use_erft:
            for name in ("noise", "latent"):
                metrics[f"bank_fill_{name}"] = jnp.mean(banks[name].count) / cap
            for k in ("clean", "noise_injected", "latent_injected", "image_injected"):
                if k in info:
                    metrics[f"rate_{k}"] = jnp.mean(jnp.asarray(info[k], jnp.float32))
        return new, metrics

    return step, module, tx
