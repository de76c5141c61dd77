"""The trainer: builds everything from a config (:func:`svi_jax.train.builder.build`), then ``run()``s the loop with
checkpoints (``svi_jax.train.checkpoints``: orbax, async, keep-N, every ``train.ckpt_every`` steps and at exit; the
data iterator's position with them, so re-running the same command resumes exactly), metrics
(``svi_jax.train.metrics``) and the export (SVI-format LoRA safetensors, or a full fine-tune's DiT directory)."""
from __future__ import annotations

import logging
import os
import signal
import time

import jax
import ml_collections

from svi_jax import dance_train, sharding
from svi_jax import lora as lora_lib
from svi_jax.errors import ConfigError
from svi_jax.models.dit import DiTConfig
from svi_jax.train import checkpoints as train_checkpoints
from svi_jax.train.builder import build
from svi_jax.train.config import learning_rate, validate_config
from svi_jax.train.metrics import MetricsLog, resolved_attention

log = logging.getLogger("svi_jax.train")


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
        if conditioner is None:
            from svi_jax.conditioners import make_conditioner

            conditioner = make_conditioner(config, self.workdir)
        self.conditioner = conditioner
        if data is None:
            from svi_jax.data.factory import make_data

            data = make_data(config, self.workdir)
        self.data = data
        # one mesh from config.mesh (svi_jax.sharding): the state is created split over it and the step is jitted
        # with explicit in/out shardings (on one device all of this is a no-op); svi_jax.plan builds the same
        self.mesh = sharding.make_mesh(config.mesh)
        built = build(config, self.mesh, conditioner=conditioner)
        self.state, self.shardings = built.state, built.shardings
        self.step_fn, self.module, self.tx = built.step, built.module, built.tx
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
    def _manager(self):  # svi_jax.train.checkpoints: sha256 sums per step, written once orbax finalises it
        c = self.config.train
        root = os.path.join(self.workdir, "checkpoints")
        self.guard = train_checkpoints.StreakGuard(root, c.keep)
        return train_checkpoints.make_manager(root, c.keep, c.async_checkpoints)

    def save(self, force: bool = False):
        import orbax.checkpoint as ocp

        step = int(self.state.step)
        if step in (self.ckpt.all_steps() or []):
            return
        if getattr(self, "nonfinite_run", 0):  # never checkpoint a non-finite streak (keep-N would drop the good one)
            log.warning("step %d: not saving a checkpoint during a run of %d non-finite steps", step,
                        self.nonfinite_run)
            return
        self.ckpt.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state.checkpoint()),
            data=ocp.args.JsonSave(train_checkpoints.data_state(self.data))), force=force)
        self.guard.prune(self.ckpt)
        if not self.config.train.async_checkpoints:
            train_checkpoints.seal(os.path.join(self.workdir, "checkpoints"))

    def restore(self) -> bool:
        abstract = sharding.abstract(self.state.checkpoint(), self.shardings.checkpoint())  # restored sharded
        latest, restored, manager = train_checkpoints.restore_newest_good(
            self.ckpt, os.path.join(self.workdir, "checkpoints"), abstract)
        self.ckpt = manager if manager is not None else self._manager()
        self.guard.on_start(self.ckpt)
        if latest is None:
            return False
        self.state = self.state.with_checkpoint(restored["state"])
        try:
            self.data.set_state(train_checkpoints.this_host_data_state(restored["data"], latest))
        except train_checkpoints.CheckpointsUnusable as e:
            raise ConfigError(str(e)) from None
        log.info("resumed from step %d (%s)", latest, os.path.join(self.workdir, "checkpoints"))
        return True

    # ---------------------------------------------------------------- loop
    def compile(self):
        """Compile the step before the loop; log its memory and FLOPs."""
        batch = self.data.peek() if hasattr(self.data, "peek") else None
        t0 = time.time()
        if batch is not None:
            batch = self.device_batch(batch)
            programs = {"": self.step_fn.lower(self.state, batch), "encoders_": self.step_fn.lower_encode(
                self.state, batch)}
            self._compiled_info = {}
            for prefix, lowered in programs.items():
                if lowered is None:
                    continue
                compiled = lowered.compile()
                try:
                    mem = compiled.memory_analysis()
                    if mem is not None:
                        self._compiled_info[prefix + "temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
                        self._compiled_info[prefix + "args_mb"] = round(mem.argument_size_in_bytes / 2**20, 1)
                except Exception:  # pragma: no cover - backend dependent
                    pass
            self._compiled_info["compile_s"] = round(time.time() - t0, 2)
            log.info("compiled train step%s: %s", " (encoders, then DiT)" if programs["encoders_"] else "",
                     self._compiled_info)

    def run(self, num_steps: int | None = None, progress: bool = True) -> dict:
        c = self.config.train
        total = c.num_steps if num_steps is None else num_steps
        self.restore()
        start = int(self.state.step)
        self.metrics = MetricsLog(self.workdir, self.config, self.mesh, start)
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
            self.metrics.write(m)
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
            train_checkpoints.seal(os.path.join(self.workdir, "checkpoints"))
            self.metrics.close()
            for s, h in old.items():
                signal.signal(s, h)
        summary.update(end_step=int(self.state.step), nonfinite_total=int(self.state.nonfinite_total))
        if c.export_lora and int(self.state.step) >= total:
            if not self.state.full:
                summary["lora_file"] = self.export_lora()
            else:
                summary["dit_dir"] = self.export_dit()
        return summary

    def export_lora(self, path: str | None = None) -> str:
        path = path or os.path.join(self.workdir, "lora.safetensors")
        from svi_jax import distributed

        lora = distributed.host_copy(self.state.lora)  # every process takes part in the gather
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
        DiT(DiTConfig.from_dict(self.config.model.to_dict()), jax.device_get(self.state.params["dit"])).save(directory)
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
