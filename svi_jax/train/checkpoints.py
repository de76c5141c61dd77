"""Training checkpoints that verify: sha256 sums per step, fallback to the newest step that verifies, no saves
during a non-finite streak.

Layout: ``WORKDIR/checkpoints/STEP/`` (orbax ``CheckpointManager``, items ``state`` and ``data``) plus
``STEP/sha256sums.json`` written as soon as orbax has finalised the step (svi_jax.integrity). On resume the newest
step is verified (checksums, orbax metadata, restore, finite values); a step that fails is reported, moved to
``WORKDIR/checkpoints_rejected/STEP`` and the next older one is tried. If no step verifies nothing is moved and the
run stops naming the problem of the newest one.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import jax

from svi_jax import integrity

log = logging.getLogger("svi_jax.train")

REJECTED_DIR = "checkpoints_rejected"


class CheckpointsUnusable(ValueError):
    """No training checkpoint of the run directory verifies, or one cannot fit the current config."""


_lock = threading.Lock()


def seal(root: str) -> None:
    """Write ``sha256sums.json`` into every finalised step directory of ``root`` that lacks one (process 0)."""
    if jax.process_index() != 0 or not os.path.isdir(root):
        return
    with _lock:
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if name.isdigit() and os.path.isdir(d) and not integrity.has_checksums(d):
                try:
                    integrity.write_checksums(d)
                except OSError as e:  # deleted under us by keep-N
                    log.debug("could not checksum %s: %s", d, e)


def make_manager(root: str, keep: int, async_checkpoints: bool):
    import orbax.checkpoint as ocp

    extra = {"async_options": ocp.AsyncOptions(post_finalization_callback=lambda: seal(root))} \
        if async_checkpoints else {}   # synchronous saves are sealed by the caller right after save()
    # keep-N is applied by StreakGuard.prune (never deleting the newest confirmed step), not by orbax
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_checkpoints, create=True,
                                        **extra)
    return ocp.CheckpointManager(root, options=opts, item_names=("state", "data"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:240] if text else type(e).__name__


def _stored_tree(step_dir: str):
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def try_restore(manager, root: str, step: int, abstract):
    """Verify and restore one step; raises IntegrityError (damaged) or CheckpointsUnusable (does not fit)."""
    import orbax.checkpoint as ocp

    from svi_jax.model_dirs import CheckpointError, check_tree

    d = os.path.join(root, str(step))
    if not integrity.verify_checksums(d):
        log.warning("checkpoint step %d has no checksums (written by an older version, or the run stopped right "
                    "after saving it): restoring it unverified", step)
    try:
        stored = _stored_tree(d)
    except Exception as e:
        raise integrity.IntegrityError(f"{d}: unreadable metadata ({_first_line(e)})") from None
    try:
        from svi_jax.model_dirs import flatten

        exp = {k: v for k, v in flatten(abstract).items() if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)}
        got = {k: v for k, v in flatten(stored).items() if k not in flatten(abstract) or k in exp}
        check_tree(exp, got, what=f"training checkpoint {d}")
    except CheckpointError as e:
        raise CheckpointsUnusable(f"{e}\nThe config's LoRA/model/bank shapes differ from the run's: resume with the "
                                  f"settings it was trained with, or use a new --workdir") from None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # tensorstore / json: truncated or damaged files
        raise integrity.IntegrityError(f"{d}: damaged ({_first_line(e)})") from None
    integrity.check_tree_finite(restored["state"], f"training checkpoint {d}")
    return restored


def restore_newest_good(manager, root: str, abstract):
    """``(step, restored, manager)`` of the newest step that verifies (``(None, None, manager)`` with no steps).

    Newer steps that fail are moved aside (``checkpoints_rejected/``) and a new manager is returned."""
    steps = sorted(manager.all_steps() or [], reverse=True)
    if not steps:
        return None, None, manager
    failures = []
    for step in steps:
        try:
            restored = try_restore(manager, root, step, abstract)
        except integrity.IntegrityError as e:
            log.warning("checkpoint step %d does not verify: %s", step, e)
            failures.append((step, e))
            continue
        if failures:
            reject(root, [s for s, _ in failures])
            log.warning("resuming from step %d, the newest checkpoint that verifies (moved the damaged step(s) %s "
                        "to %s)", step, [s for s, _ in failures],
                        os.path.join(os.path.dirname(root), REJECTED_DIR))
            manager.close()
            manager = None
        return step, restored, manager
    step, e = failures[0]
    raise CheckpointsUnusable(f"no checkpoint in {root} verifies (newest, step {step}: {e}); move {root} away to "
                              f"start the run over")


def reject(root: str, steps) -> None:
    if jax.process_index() != 0:
        return
    dest_root = os.path.join(os.path.dirname(root), REJECTED_DIR)
    os.makedirs(dest_root, exist_ok=True)
    for s in steps:
        dest = os.path.join(dest_root, str(s))
        n = 1
        while os.path.exists(dest):
            dest, n = os.path.join(dest_root, f"{s}.{n}"), n + 1
        shutil.move(os.path.join(root, str(s)), dest)


class StreakGuard:
    """Which checkpoints are known good, so a non-finite streak never costs the last good one.

    A checkpoint of step ``s`` is *confirmed* once step ``s + 1`` had a finite loss and gradient (its state went on
    to train); the steps found on disk when a run starts count as confirmed. Pruning to ``train.keep`` never deletes
    the newest confirmed step; when a streak stops the run, the unconfirmed steps newer than it are moved to
    ``checkpoints_rejected/`` (the divergence began before the streak) and the confirmed step is the one named."""

    def __init__(self, root: str, keep: int):
        self.root, self.keep = root, int(keep)
        self.confirmed: set[int] = set()

    def on_start(self, manager) -> None:
        self.confirmed = set(manager.all_steps() or [])

    def on_metrics(self, manager, step: int, finite: bool) -> None:
        if finite and (step - 1) in set(manager.all_steps() or []):
            self.confirmed.add(step - 1)

    def newest_confirmed(self, manager):
        return max(self.confirmed & set(manager.all_steps() or []), default=None)

    def prune(self, manager) -> None:
        steps = sorted(manager.all_steps() or [])
        protect = self.newest_confirmed(manager)
        for s in steps[: max(len(steps) - self.keep, 0)]:
            if s != protect:
                manager.delete(s)

    def on_stop(self, manager):
        """Reject the unconfirmed steps newer than the newest confirmed one; return that step (or None)."""
        good = self.newest_confirmed(manager)
        bad = [s for s in manager.all_steps() or [] if s not in self.confirmed and (good is None or s > good)]
        if bad:
            manager.wait_until_finished()
            reject(self.root, bad)
            log.warning("moved checkpoint(s) %s, saved just before the non-finite streak, to %s", sorted(bad),
                        os.path.join(os.path.dirname(self.root), REJECTED_DIR))
        return good


def data_state(data) -> dict:
    """What a checkpoint keeps of the data iterator: its state, or with several processes every host's
    (``{"hosts": [...]}``, gathered: each host reads its own shard and orbax writes JSON items from process 0 only)."""
    state = data.get_state()
    if jax.process_count() == 1:
        return state
    from svi_jax import distributed

    return {"hosts": distributed.gather_json(state)}


def this_host_data_state(saved: dict, step: int) -> dict:
    """This process's data iterator state out of a checkpoint's ``data`` item (see :func:`data_state`)."""
    if "hosts" not in saved:
        if jax.process_count() > 1:
            raise CheckpointsUnusable(f"the checkpoint of step {step} was written by 1 process, this run has "
                                      f"{jax.process_count()}: resume with the same number of processes")
        return saved
    hosts = saved["hosts"]
    if len(hosts) != jax.process_count():
        raise CheckpointsUnusable(f"the checkpoint of step {step} was written by {len(hosts)} processes, this run has "
                                  f"{jax.process_count()}: resume with the same number of processes")
    return hosts[jax.process_index()]
