"""ERFT LoRA training: ``python -m svi_jax.train --config configs/shot.py --workdir DIR [--config.key=value ...]``.

One pure, jitted, donated train step over a state pytree::

    state = {params (frozen DiT + encoders), lora, opt, banks {noise, latent}, rng, step, nonfinite_run,
             nonfinite_total}

does: (encode pixels with the frozen VAE/UMT5/CLIP, or take cached latents) -> flow-matching noise at shift 5 with
the official timestep sampling and loss weighting -> ERFT error injection -> DiT forward with the LoRA collection ->
weighted MSE -> grads w.r.t. the LoRA only -> clip -> AdamW -> error curation -> bank inserts. A non-finite loss or
gradient skips the update (counted); ``train.max_nonfinite`` in a row stops the run.

Checkpoints (orbax ``CheckpointManager``, async, keep-N, every ``train.ckpt_every`` steps and at exit) hold everything
that changes (LoRA, optimizer state, banks, RNG, step) and the data iterator's position; re-running the same command
resumes exactly. Metrics go to ``metrics.jsonl`` and TensorBoard; the LoRA is exported as SVI-format safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from svi_jax import dance_train, flow, sharding
from svi_jax import lora as lora_lib
from svi_jax.models.dit import DiTConfig, WanDiT, init_params
from svi_jax.models.layers import dtype_of
from svi_jax.errors import ConfigError  # noqa: F401 (API: svi_jax.train.ConfigError)
from svi_jax.logs import quiet_logs  # noqa: F401 (API)

log = logging.getLogger("svi_jax.train")

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------ config


def validate_config(config) -> None:
    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(config.train.num_steps >= 0, "train.num_steps", f"must be >= 0, got {config.train.num_steps}")
    need(config.train.ckpt_every >= 1, "train.ckpt_every", f"must be >= 1, got {config.train.ckpt_every}")
    need(config.train.keep >= 1, "train.keep", f"must be >= 1, got {config.train.keep}")
    need(config.lora.rank >= 1, "lora.rank", f"must be >= 1, got {config.lora.rank}")
    need(config.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {config.data.batch_size}")
    need(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    need(config.optim.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {config.optim.grad_clip}")
    for p in ("p_noise", "p_latent", "p_image", "p_clean", "p_insert_clean"):
        v = config.erft[p]
        need(0.0 <= v <= 1.0, f"erft.{p}", f"is a probability, got {v}")
    need(config.erft.capacity >= 1, "erft.capacity", f"must be >= 1, got {config.erft.capacity}")
    need(config.erft.num_grids >= 1, "erft.num_grids", f"must be >= 1, got {config.erft.num_grids}")
    need(config.erft.bank_dtype in ("bfloat16", "float32", "int8"), "erft.bank_dtype",
         f"must be bfloat16, float32 or int8, got {config.erft.bank_dtype!r}")
    try:
        DiTConfig.from_dict(config.model.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def latent_shape(config) -> tuple[int, int, int, int]:
    """Per-example latent shape ``(F, H/s, W/s, z_dim)`` of the training clips (s = 8 for the Wan VAE)."""
    d = config.data
    vae = config.encoders.vae
    s = int(vae.get("spatial", 4)) if vae.get("kind", "wan") == "patch" else 8
    if (d.num_frames - 1) % 4:
        raise ConfigError(f"config.data.num_frames must be 1 + 4k (the VAE packs 4 frames), got {d.num_frames}")
    if d.height % (2 * s) or d.width % (2 * s):
        raise ConfigError(f"config.data.height/width must be multiples of {2 * s}, got {d.height}x{d.width}")
    return (1 + (d.num_frames - 1) // 4, d.height // s, d.width // s, config.model.out_dim)


# ------------------------------------------------------------------------------------------------ the step


def learning_rate(config):
    """``optim.lr``, or with ``optim.schedule='cosine'`` a decay from it to 0 over ``train.num_steps``."""
    o = config.optim
    schedule = o.get("schedule", "constant")
    if schedule == "cosine":  # e.g. to finish pre-training a base
        return optax.cosine_decay_schedule(o.lr, max(1, int(config.train.num_steps)))
    if schedule != "constant":
        raise ConfigError(f"config.optim.schedule must be 'constant' or 'cosine', got {schedule!r}")
    return o.lr


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def is_full(config) -> bool:
    """``train.trainable``: 'lora' (SVI: the LoRA only) or 'full' (every DiT parameter, e.g. to pre-train a base)."""
    mode = config.train.get("trainable", "lora")
    if mode not in ("lora", "full"):
        raise ConfigError(f"config.train.trainable must be 'lora' or 'full', got {mode!r}")
    return mode == "full"


def trainable_of(state: dict, full: bool) -> dict:
    return {"dit": state["params"]["dit"]} if full else {"lora": state["lora"]}


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def make_train_step(config, prepare: Callable[[Any, dict, jax.Array], dict]):
    """The pure train step ``(state, batch) -> (state, metrics)``.

    ``prepare(params, batch, key)`` turns a batch into model inputs ``{x0, y, context, clip_fea}`` (frozen, no
    gradient): the VAE/UMT5/CLIP encoders for pixel batches, or the identity for cached latents.
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
    full = is_full(config)
    cap = int(config.erft.capacity)
    p_drop_audio = float(config.get("talk", {}).get("p_drop_audio", 0.0))

    def step(state, batch):
        rng, k_t, k_eps, k_inj, k_cur, k_prep = jax.random.split(state["rng"], 6)
        inputs = jax.lax.stop_gradient(prepare(state["params"], batch, k_prep))
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
        if use_erft:  # svi_jax.sharding.inject/curate: erft.inject/curate for one bank or per-replica banks
            x_t, target, y_in, info = sharding.inject(k_inj, state["banks"], x0, y, eps, t, sigma, config.erft)
        else:
            x_t, target, y_in = flow.add_noise(x0, eps, sigma), flow.velocity_target(x0, eps), y
            info = {}
        y_in = dance_train.suppress_y_error(y_in, y_null)
        cdt = dtype_of(dit_cfg.dtype)

        def loss_fn(trainable):
            variables = {"params": trainable["dit"] if full else state["params"]["dit"]}
            if not full:
                variables["lora"] = trainable["lora"]
            v = module.apply(dance_train.forward_variables(variables), x_t.astype(cdt), t, ctx.astype(cdt),
                             clip_fea=None if clip is None else clip.astype(cdt),
                             y=None if y_in is None else y_in.astype(cdt), extra=extra,
                             audio=None if audio is None else tuple(a.astype(cdt) for a in audio))
            per_example = jnp.mean(jnp.square(v - target.astype(jnp.float32)), axis=tuple(range(1, v.ndim)))
            return jnp.mean(per_example * w), v

        trainable = trainable_of(state, full)
        (loss, v_pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_new = tx.update(grads, state["opt"], trainable)
        trained = _tree_where(ok, optax.apply_updates(trainable, updates), trainable)
        new = dict(state)
        if full:
            new["params"] = dict(state["params"], dit=trained["dit"])
        else:
            new["lora"] = trained["lora"]
        new["opt"] = _tree_where(ok, opt_new, state["opt"])
        if use_erft:
            # a cond, not a select: a skipped step keeps the banks without copying them (in place when donated)
            new["banks"] = jax.lax.cond(
                ok, lambda banks: sharding.curate(k_cur, banks, t, sigma, v_pred, target, info, state["step"],
                                                  config.erft),
                lambda banks: banks, state["banks"])
        new["rng"] = rng
        new["step"] = state["step"] + 1
        new["nonfinite_run"] = jnp.where(ok, 0, state["nonfinite_run"] + 1)
        new["nonfinite_total"] = state["nonfinite_total"] + (~ok).astype(jnp.int32)
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": (~ok).astype(jnp.float32),
                   "t_mean": jnp.mean(t), "nonfinite_run": new["nonfinite_run"]}
        if use_erft:
            for name in ("noise", "latent"):
                metrics[f"bank_fill_{name}"] = jnp.mean(new["banks"][name].count) / cap
            for k in ("clean", "noise_injected", "latent_injected", "image_injected"):
                if k in info:
                    metrics[f"rate_{k}"] = jnp.mean(jnp.asarray(info[k], jnp.float32))
        return new, metrics

    return step, module, tx


def sharded_train_step(config, conditioner, mesh, state_shardings):
    """The train step as the trainer runs it, jitted on ``mesh`` with ``state_shardings`` (``sharding.TrainStep``;
    ``svi_jax.plan`` compiles this very object). Returns ``(step, module, tx)``."""
    step_fn, module, tx = make_train_step(config, conditioner.prepare)
    enc = sharding.encoder_configs(conditioner)
    return sharding.TrainStep(step_fn, mesh, config, state_shardings, tx, enc), module, tx


def run_header(config, mesh) -> dict:
    """The first row of ``metrics.jsonl``: the attention ``auto`` resolved to, platform, mesh, remat policy."""
    return {"attention": resolved_attention(config, mesh), "attention_config": config.model.attention,
            "platform": mesh.devices.flat[0].platform, "mesh": {k: int(v) for k, v in dict(mesh.shape).items()},
            "remat_policy": config.model.get("remat_policy", "full"), "processes": jax.process_count()}


def resolved_attention(config, mesh) -> str:
    """What ``config.model.attention`` runs as on ``mesh``'s devices (``auto``: the platform's fused kernel)."""
    from svi_jax.models.layers import resolve_attention

    return resolve_attention(config.model.attention, mesh.devices.flat[0].platform, mesh.devices.size)


# ------------------------------------------------------------------------------------------------ setup


def init_state(config, params, key) -> dict:
    """Fresh train state around frozen ``params`` ({'dit': ..., encoders ...})."""
    k_lora, k_rng = jax.random.split(key)
    state = {"params": params, "rng": k_rng, "step": jnp.zeros((), jnp.int32),
             "nonfinite_run": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}
    full = is_full(config)
    if not full:
        state["lora"] = lora_lib.init_lora(params["dit"], k_lora, config.lora.rank, config.lora.targets,
                                           dtype_of(config.lora.dtype))
        if dance_train.enabled(config):       # SVI-Dance: the pose module is trained with the LoRA
            state["lora"] = dance_train.init_trainable(config, params["dit"], state["lora"])
    state["opt"] = make_optimizer(config).init(trainable_of(state, full))
    if config.erft.enabled:
        bank_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "int8": jnp.int8}[config.erft.bank_dtype]
        state["banks"] = sharding.init_banks(config, latent_shape(config), dtype=bank_dtype)
    return state


def saved_part(state: dict) -> dict:
    """What a checkpoint stores: everything that changes (frozen params are not saved; a full fine-tune saves the
    DiT it trains)."""
    out = {k: v for k, v in state.items() if k != "params"}
    if "lora" not in state:
        out["dit"] = state["params"]["dit"]
    return out


def with_saved(state: dict, saved: dict) -> dict:
    """``state`` with a restored ``saved_part`` put back."""
    saved = dict(saved)
    params = state["params"]
    if "dit" in saved:
        params = dict(params, dit=saved.pop("dit"))
    return {"params": params, **saved}


def load_frozen_params(config, key) -> dict:
    """The frozen DiT (converted checkpoint at ``config.checkpoints.dit``, or a seeded random init)."""
    if config.get("pro", None) is not None:   # SVI 2.0 Pro: the trained expert of the Wan2.2 pair
        from svi_jax.pro import load_experts

        return load_experts(config, key, (config.pro.expert,))[config.pro.expert]
    cfg = DiTConfig.from_dict(config.model.to_dict())
    path = config.checkpoints.get("dit", "")
    if path:
        from svi_jax.models.dit import DiT

        dit = DiT.from_dir(path)
        bad = cfg.architecture_mismatch(dit.config)
        if bad:
            raise ConfigError(f"config.model.{bad[0]} = {bad[1]!r} but the DiT checkpoint {path} has {bad[2]!r}")
        p = dit.params
    else:
        p = init_params(cfg, jax.random.fold_in(key, 1))
    p = dance_train.with_pose_params(cfg, p, jax.random.fold_in(key, 3))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype_of(cfg.param_dtype)), p)


# ------------------------------------------------------------------------------------------------ driver


class Trainer:
    """Builds everything from a config, then ``run()``s the loop with checkpoints, metrics and export."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, data=None, conditioner=None):
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        from svi_jax import run_config  # refuse changed settings on resume; keep config.json, add config.N.json

        from svi_jax import distributed

        resuming = _has_checkpoints(self.workdir)
        try:  # every process reads and judges the same files; only then does process 0 write (no torn reads)
            run_config.check_and_record(config, self.workdir, resuming=resuming, write=False)
            distributed.sync("svi_jax.run_config")
            if jax.process_index() == 0:
                run_config.check_and_record(config, self.workdir, resuming=resuming, write=True)
        except run_config.SettingsChanged as e:
            raise ConfigError(str(e)) from None
        key = jax.random.key(config.train.seed)
        if conditioner is None:
            from svi_jax.conditioners import make_conditioner

            conditioner = make_conditioner(config, self.workdir)
        self.conditioner = conditioner
        if data is None:
            from svi_jax.data.factory import make_data

            data = make_data(config, self.workdir)
        self.data = data
        params = {"dit": load_frozen_params(config, key), **conditioner.params}
        # one mesh from config.mesh (svi_jax.sharding): the state is created split over it and the step is jitted
        # with explicit in/out shardings (on one device all of this is a no-op)
        self.mesh = sharding.make_mesh(config.mesh)
        enc = sharding.encoder_configs(conditioner)
        self.state, self.shardings = sharding.init_sharded(lambda p, k: init_state(config, p, k), params,
                                                           jax.random.fold_in(key, 2), self.mesh, config,
                                                           make_optimizer(config), enc)
        self.step_fn, self.module, self.tx = sharded_train_step(config, conditioner, self.mesh, self.shardings)
        log.info("attention: %s -> %s on %s", config.model.attention, resolved_attention(config, self.mesh),
                 self.mesh.devices.flat[0].platform)
        self.ckpt = self._manager()

    def device_batch(self, host_batch: dict) -> dict:
        """This host's batch -> global arrays split over the mesh's data x fsdp axes."""
        from svi_jax import distributed

        batch = self.conditioner.device_batch(host_batch)
        if self.step_fn.batch_shardings is None:
            self.step_fn.build(self.state, batch)
        return distributed.global_batch(batch, self.step_fn.batch_shardings)

    # ---------------------------------------------------------------- checkpoints
    def _manager(self):  # svi_jax.train_checkpoints: sha256 sums per step, written once orbax finalises it
        from svi_jax import train_checkpoints

        c = self.config.train
        root = os.path.join(self.workdir, "checkpoints")
        self.guard = train_checkpoints.StreakGuard(root, c.keep)
        return train_checkpoints.make_manager(root, c.keep, c.async_checkpoints)

    def save(self, force: bool = False):
        import orbax.checkpoint as ocp

        step = int(self.state["step"])
        if step in (self.ckpt.all_steps() or []):
            return
        if getattr(self, "nonfinite_run", 0):  # never checkpoint a non-finite streak (keep-N would drop the good one)
            log.warning("step %d: not saving a checkpoint during a run of %d non-finite steps", step,
                        self.nonfinite_run)
            return
        from svi_jax.train_checkpoints import data_state

        self.ckpt.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(saved_part(self.state)),
            data=ocp.args.JsonSave(data_state(self.data))), force=force)
        self.guard.prune(self.ckpt)
        if not self.config.train.async_checkpoints:
            from svi_jax.train_checkpoints import seal

            seal(os.path.join(self.workdir, "checkpoints"))

    def restore(self) -> bool:
        from svi_jax import train_checkpoints

        abstract = sharding.abstract(saved_part(self.state), saved_part(self.shardings))  # restored sharded
        latest, restored, manager = train_checkpoints.restore_newest_good(
            self.ckpt, os.path.join(self.workdir, "checkpoints"), abstract)
        self.ckpt = manager if manager is not None else self._manager()
        self.guard.on_start(self.ckpt)
        if latest is None:
            return False
        self.state = with_saved(self.state, restored["state"])
        try:
            self.data.set_state(train_checkpoints.this_host_data_state(restored["data"], latest))
        except train_checkpoints.CheckpointsUnusable as e:
            raise ConfigError(str(e)) from None
        log.info("resumed from step %d (%s)", latest, os.path.join(self.workdir, "checkpoints"))
        return True

    # ---------------------------------------------------------------- metrics
    def _open_metrics(self, start_step: int):
        """metrics.jsonl keeps exactly the rows of steps <= the restored step (a resumed run rewrites the rest)."""
        if jax.process_index() != 0:  # multi-host: process 0 writes metrics and TensorBoard
            self.metrics_file, self.tb = open(os.devnull, "w"), None
            return
        path = os.path.join(self.workdir, METRICS_FILE)
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a killed run
                    if r.get("step", 0) <= start_step:
                        rows.append(line if line.endswith("\n") else line + "\n")
        if not rows:  # a new run: the header row says what the run is (readers skip rows without "step")
            rows.append(json.dumps({"header": run_header(self.config, self.mesh)}) + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)
        self.metrics_file = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=start_step + 1)
        except ImportError:  # pragma: no cover
            self.tb = None

    def _log(self, row: dict):
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    # ---------------------------------------------------------------- loop
    def compile(self):
        """Compile the step before the loop; log its memory and FLOPs."""
        batch = self.data.peek() if hasattr(self.data, "peek") else None
        t0 = time.time()
        if batch is not None:
            lowered = self.step_fn.lower(self.state, self.device_batch(batch))
            compiled = lowered.compile()
            self._compiled_info = {"compile_s": round(time.time() - t0, 2)}
            try:
                mem = compiled.memory_analysis()
                if mem is not None:
                    self._compiled_info["temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
                    self._compiled_info["args_mb"] = round(mem.argument_size_in_bytes / 2**20, 1)
            except Exception:  # pragma: no cover - backend dependent
                pass
            log.info("compiled train step: %s", self._compiled_info)

    def run(self, num_steps: int | None = None, progress: bool = True) -> dict:
        c = self.config.train
        total = c.num_steps if num_steps is None else num_steps
        self.restore()
        start = int(self.state["step"])
        self._open_metrics(start)
        stop = {"flag": False}

        def on_term(signum, frame):  # SIGTERM/SIGINT: finish the step, save, exit
            stop["flag"] = True

        old = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _in_main_thread() else {}
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, disable=not progress)
        last = {"t": time.time()}
        summary = {"start_step": start}
        # Metrics are fetched one step late: step k+1 is dispatched (and its batch prepared) before the host waits for
        # step k's numbers, so the host never idles the device. The step counter is kept on the host (no sync).
        pending: list = []
        schedule = learning_rate(self.config)

        def report():
            if not pending:
                return
            step, metrics = pending.pop()
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            nonfinite_run = self.nonfinite_run = int(m.pop("nonfinite_run"))
            self.guard.on_metrics(self.ckpt, step, nonfinite_run == 0)
            now = time.time()
            lr = float(schedule(step - 1) if callable(schedule) else schedule)   # the rate this step's update used
            m.update(step=step, lr=lr, steps_per_s=1.0 / max(now - last["t"], 1e-9))
            last["t"] = now
            self._log(m)
            bar.update(1)
            post = {"loss": f"{m['loss']:.4f}", "it/s": f"{m['steps_per_s']:.2f}"}
            if "bank_fill_latent" in m:
                post["bank"] = f"{100 * m['bank_fill_latent']:.1f}%"
            bar.set_postfix(post)
            if nonfinite_run >= c.max_nonfinite:
                good = self.guard.on_stop(self.ckpt)
                where = (f"the last good state is the checkpoint of step {good} "
                         f"({os.path.join(self.workdir, 'checkpoints', str(good))}; none was written during the "
                         f"streak), which a rerun resumes from" if good is not None else
                         "no checkpoint was written before the streak, so a rerun starts from step 0")
                raise FloatingPointError(
                    f"{nonfinite_run} non-finite steps in a row (loss or gradient was NaN/inf) at step {step}; "
                    f"{where}. Lower optim.lr (with --config.train.allow_changes=optim.lr) or check the data.")

        try:
            step = start
            while step < total and not stop["flag"]:
                batch = self.device_batch(next(self.data))
                self.state, metrics = self.step_fn(self.state, batch)
                step += 1
                report()                                   # the previous step's numbers, while this one runs
                pending.append((step, metrics))
                if step % c.ckpt_every == 0:
                    report()                               # a checkpoint waits for the step anyway
                    self.save()
            report()
            self.save(force=True)
        finally:
            bar.close()
            self.ckpt.wait_until_finished()
            from svi_jax.train_checkpoints import seal

            seal(os.path.join(self.workdir, "checkpoints"))
            self.metrics_file.close()
            if self.tb is not None:
                self.tb.close()
            for s, h in old.items():
                signal.signal(s, h)
        summary.update(end_step=int(self.state["step"]), nonfinite_total=int(self.state["nonfinite_total"]))
        if c.export_lora and int(self.state["step"]) >= total:
            if "lora" in self.state:
                summary["lora_file"] = self.export_lora()
            else:
                summary["dit_dir"] = self.export_dit()
        return summary

    def export_lora(self, path: str | None = None) -> str:
        path = path or os.path.join(self.workdir, "lora.safetensors")
        from svi_jax import distributed

        lora = distributed.host_copy(self.state["lora"])  # every process takes part in the gather
        if distributed.is_main_process():
            scale = self.config.lora.alpha / self.config.lora.rank   # the trained x W + s (x A) B, folded into B
            if dance_train.POSE in lora:             # SVI-Dance: LoRA + dwpose_embedding, official names
                dance_train.export(dance_train.fold_scale(lora, scale), path)
            else:
                lora_lib.save(lora, path, prefix=self.config.lora.export_prefix, scale=scale)
        return path

    def export_dit(self, directory: str | None = None) -> str:
        """A full fine-tune's DiT as a model directory (``svi_jax.load`` / ``config.checkpoints.dit``)."""
        from svi_jax.models.dit import DiT

        directory = directory or os.path.join(self.workdir, "dit")
        DiT(DiTConfig.from_dict(self.config.model.to_dict()), jax.device_get(self.state["params"]["dit"])).save(directory)
        return directory

    def close(self):
        self.ckpt.close()
        if hasattr(self.data, "close"):
            self.data.close()


def _has_checkpoints(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------ CLI


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    from svi_jax import distributed

    distributed.initialize()  # multi-host (TPU pod, Slurm): from the environment; a no-op for one process
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    try:
        trainer = Trainer(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.compile()
    summary = trainer.run()
    trainer.close()
    print(json.dumps(summary))
    return 0


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file, e.g. configs/tiny.py (the embedded CPU default), configs/shot.py, "
        "configs/film.py. Override any field with --config.a.b=value (e.g. --config.train.num_steps=10).",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/, lora.safetensors. "
                        "Re-running with the same workdir resumes from its latest checkpoint.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from svi_jax import cli  # one-line errors (exit 2), tracebacks only with --debug / SVI_DEBUG=1

    cli.absl_run(main, _define_flags)
