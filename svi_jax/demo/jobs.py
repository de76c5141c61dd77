"""Jobs of the web demo and the queue that runs them one at a time.

A :class:`Job` is one long-video generation: its inputs (reference image, clip prompts, seed), its state
(``queued`` -> ``running`` -> ``done`` / ``stopped`` / ``failed``; a stopped or failed job can be resumed) and an
append-only list of events the page follows over server-sent events. :class:`JobQueue` owns a single worker thread:
one generation at a time per process, the others wait in FIFO order (at most ``max_queued``).

:class:`SamplerRunner` runs a job with the project's long-video code path, :func:`svi_jax.sample.generate`, into
``JOB/out.mp4`` (+ ``out.json``, ``out.mp4.parts/``): the same clips, files and resume state as ``python -m
svi_jax.sample``. Its per-clip callback turns each finished clip into an event (thumbnail, timings); a stop request
is honoured at the next sampling step (the clip in progress is dropped, the committed clips stay) and a resume
continues from the committed state (``generate(..., resume=True)``), so a stopped-and-resumed video equals an
uninterrupted one.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("svi_jax.demo")

STATES = ("queued", "running", "stopping", "stopped", "done", "failed")


class StopRequested(Exception):
    """Raised inside a generation (step or clip callback) when its job was asked to stop."""


class QueueFull(Exception):
    pass


class Job:
    def __init__(self, job_dir: str, prompts: list[str], seed: int, image: str, job_id: Optional[str] = None,
                 created: Optional[float] = None, schedule: Optional[str] = None):
        self.id = job_id or secrets.token_hex(6)
        self.dir = job_dir
        self.prompts, self.seed, self.image = list(prompts), int(seed), image
        self.schedule = schedule                     # a pasted schedule's text (svi_jax.schedule), or None
        self.created = created or time.time()
        self.status = "queued"
        self.error: Optional[str] = None
        self.clips: list[dict] = []
        self.resume = False
        self.stop_event = threading.Event()
        self._events: list[dict] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- files
    @property
    def out(self) -> str:
        return os.path.join(self.dir, "out.mp4")

    @property
    def image_path(self) -> str:
        return os.path.join(self.dir, self.image)

    def thumb_path(self, k: int) -> str:
        return os.path.join(self.dir, "thumbs", f"clip_{k:04d}.png")

    def save(self) -> None:
        """``JOB/job.json``: what a restarted server needs to list the job and resume it."""
        from svi_jax.video_io import atomic_write_bytes

        meta = {"id": self.id, "prompts": self.prompts, "seed": self.seed, "image": self.image,
                "created": self.created, "schedule": self.schedule}
        atomic_write_bytes(os.path.join(self.dir, "job.json"), json.dumps(meta, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, job_dir: str) -> "Job":
        with open(os.path.join(job_dir, "job.json")) as f:
            m = json.load(f)
        job = cls(job_dir, m["prompts"], m["seed"], m["image"], m["id"], m.get("created"), m.get("schedule"))
        for k, rec in enumerate(read_records(job.out)):
            job.add_clip(clip_event(job, k, rec))
        job.set_status("done" if len(job.clips) >= len(job.prompts) else "stopped")
        return job

    # ---------------------------------------------------------------- events
    def emit(self, event: str, **data) -> None:
        with self._lock:
            self._events.append({"id": len(self._events), "event": event, "data": data})

    def events_since(self, cursor: int) -> list[dict]:
        with self._lock:
            return self._events[max(cursor, 0):]

    def set_status(self, status: str, error: Optional[str] = None, **extra) -> None:
        assert status in STATES, status
        self.status, self.error = status, error
        self.emit("status", status=status, error=error, done=len(self.clips), total=len(self.prompts), **extra)

    def add_clip(self, rec: dict) -> None:
        self.clips = self.clips[:rec["clip"]] + [rec]
        self.emit("clip", **rec)

    def to_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "error": self.error, "prompts": self.prompts,
                "seed": self.seed, "num_clips": len(self.prompts), "done": len(self.clips), "clips": self.clips,
                "created": self.created, "video": f"/api/jobs/{self.id}/video.mp4" if self.clips else None}


def read_records(out: str) -> list[dict]:
    """The clip records of the sidecar ``OUT.json`` :func:`svi_jax.sample.generate` writes ([] before clip 1)."""
    side = os.path.splitext(out)[0] + ".json"
    try:
        with open(side) as f:
            return json.load(f).get("clips", [])
    except (OSError, ValueError):
        return []


def clip_event(job: Job, k: int, rec: dict) -> dict:
    """The page's view of clip ``k``: prompt, seed, frames, timings, thumbnail and the video so far."""
    return {"clip": k, "prompt": rec.get("prompt"), "seed": rec.get("seed"), "frames": rec.get("frames"),
            "timings": rec.get("timings", {}), "thumb": f"/api/jobs/{job.id}/thumbs/{k}.png",
            "video": f"/api/jobs/{job.id}/video.mp4?clips={k + 1}", "total": len(job.prompts)}


def write_thumbnail(frames, path: str, width: int = 192) -> None:
    """The middle frame of a clip, scaled to ``width`` px wide (nearest-neighbour when enlarging a tiny model's
    frames, so they stay sharp), as PNG."""
    from PIL import Image

    from svi_jax.video_io import atomic_write_bytes
    import io

    frame = frames[len(frames) // 2]
    img = Image.fromarray(frame)
    h = max(1, round(frame.shape[0] * width / frame.shape[1]))
    img = img.resize((width, h), Image.NEAREST if width >= frame.shape[1] else Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ queue


class JobQueue:
    """One worker thread runs jobs in FIFO order with ``runner(job)``; at most ``max_queued`` jobs wait.

    ``make_runner()`` is called once in the worker thread before the first job (loading the models there keeps the
    web server answering meanwhile); ``ready`` / ``load_error`` report it."""

    def __init__(self, make_runner: Callable[[], Callable[[Job], None]], max_queued: int = 4):
        self.max_queued = int(max_queued)
        self.jobs: dict[str, Job] = {}
        self.ready, self.load_error = False, None
        self.current: Optional[Job] = None
        self._make_runner = make_runner
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="svi-demo-worker", daemon=True)
        self._thread.start()

    def add(self, job: Job) -> None:
        """Register a job without queueing it (a job found on disk at start-up)."""
        with self._cv:
            self.jobs[job.id] = job

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its place (0 = next). Raises :class:`QueueFull`."""
        with self._cv:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} waiting jobs): try again when one has "
                                f"finished")
            self.jobs[job.id] = job
            job.stop_event.clear()
            self._waiting.append(job)
            job.set_status("queued", position=len(self._waiting) - 1)
            self._cv.notify_all()
            return len(self._waiting) - 1

    def position(self, job: Job) -> Optional[int]:
        with self._cv:
            return self._waiting.index(job) if job in self._waiting else None

    def stop(self, job: Job) -> None:
        """A queued job leaves the queue; a running one stops at its next sampling step."""
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                job.set_status("stopped")
                self._announce_positions()
            elif job is self.current and job.status == "running":
                job.stop_event.set()
                job.set_status("stopping")
            else:
                raise ValueError(f"job {job.id} is {job.status}: only a queued or running job can be stopped")

    def resume(self, job: Job) -> int:
        """Queue a stopped or failed job again; it continues from its last finished clip."""
        if job.status not in ("stopped", "failed"):
            raise ValueError(f"job {job.id} is {job.status}: only a stopped or failed job can be resumed")
        job.resume = True
        return self.submit(job)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            if self.current is not None:
                self.current.stop_event.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    def _announce_positions(self) -> None:
        for i, j in enumerate(self._waiting):
            j.emit("status", status="queued", error=None, position=i, done=len(j.clips), total=len(j.prompts))

    def _work(self) -> None:
        try:
            runner = self._make_runner()
            self.ready = True
        except Exception as e:            # noqa: BLE001 -- reported on the page and to every job
            log.exception("loading the models failed")
            self.load_error = f"loading the models failed: {e}"
            runner = None
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self.current = job
                self._announce_positions()
                if runner is None:
                    job.set_status("failed", self.load_error)
                    self.current = None
                    continue
                job.set_status("running")
            self._run(runner, job)

    def _run(self, runner, job: Job) -> None:
        try:
            runner(job)
        except StopRequested:
            status, error = "stopped", None
        except Exception as e:            # noqa: BLE001 -- a failed job is reported, the server goes on
            if job.stop_event.is_set():   # a stop raised inside the compiled loop arrives wrapped by XLA
                status, error = "stopped", None
            else:
                log.exception("job %s failed", job.id)
                status, error = "failed", f"{type(e).__name__}: {e}".splitlines()[0][:500]
        else:
            status, error = "done", None
        with self._cv:
            self.current = None
            job.set_status(status, error)


# ------------------------------------------------------------------------------------------------ runner


class SamplerRunner:
    """Runs jobs through :func:`svi_jax.sample.generate` on one :class:`svi_jax.sample.LongVideoSampler`.

    Build the sampler with ``on_step=runner.on_step`` (the compiled loop's step callback): it reports step progress
    and raises :class:`StopRequested` when the running job is asked to stop."""

    def __init__(self, sampler_factory: Callable[[Callable[[int], None]], object], *, seed_times: int = 42,
                 fps: float = 24.0, crf: int = 17, inputs: Optional[dict] = None):
        self.job: Optional[Job] = None
        self.clip = 0
        self.sampler = sampler_factory(self.on_step)
        self.seed_times, self.fps, self.crf = int(seed_times), float(fps), int(crf)
        self.inputs = dict(inputs or {})
        hold = os.environ.get("SVI_DEMO_HOLD_AT")    # tests: "clip:step" waits there (first run) for a stop
        self.hold_at = tuple(int(v) for v in hold.split(":")) if hold else None

    def on_step(self, i) -> None:
        job = self.job
        if job is None:
            return
        if job.stop_event.is_set():
            raise StopRequested(job.id)
        job.emit("step", clip=self.clip, step=int(i) + 1, steps=self.sampler.num_steps)
        if self.hold_at == (self.clip, int(i)) and not job.resume:
            job.stop_event.wait(300)
            raise StopRequested(job.id)

    def _on_clip(self, job: Job, k: int) -> None:
        from svi_jax import sample, video_io

        rec = read_records(job.out)[k]
        write_thumbnail(video_io.read_mp4(sample.Output(job.out).segment(k)), job.thumb_path(k))
        job.add_clip(clip_event(job, k, rec))
        self.clip = k + 1
        if job.stop_event.is_set() and k + 1 < len(job.prompts):
            raise StopRequested(job.id)

    def __call__(self, job: Job) -> None:
        from svi_jax import images, sample
        from svi_jax.prompt_checks import token_count

        s = self.sampler
        reference = images.load_image(job.image_path, s.H, s.W)
        limit = s.tokenizer.text_len
        for i, p in enumerate(dict.fromkeys(job.prompts)):
            n = token_count(s.tokenizer, p)
            if n > limit:
                job.emit("warning", message=f"prompt {job.prompts.index(p) + 1} is {n} tokens: the text encoder "
                                            f"reads the first {limit}")
        inputs = dict(self.inputs, image_sha256=sample.file_sha256(job.image_path))
        clip_setup = None
        if job.schedule:                             # per-clip settings: the CLI's --schedule code path
            from svi_jax import schedule
            from svi_jax.demo.validate import LORAS_REFUSED

            plan = schedule.parse(job.schedule, schedule.Defaults(
                prompt=None, negative_prompt=s.negative_prompt, seed=job.seed, seed_times=self.seed_times,
                steps=s.num_steps, cfg_scale=s.cfg_scale, solver=s.solver, motion_frames=s.m), "text",
                loras_refused=LORAS_REFUSED)
            plan.clips = plan.clips[:len(job.prompts)]
            clip_setup = plan.runner(s)
            inputs.update(plan.inputs())
        self.job, self.clip = job, len(job.clips) if job.resume else 0
        try:
            sample.generate(s, reference, job.prompts, job.out, seed=job.seed, seed_times=self.seed_times,
                            inputs=inputs, resume=job.resume, overwrite=not job.resume, fps=self.fps, crf=self.crf,
                            progress=False, on_clip=lambda k: self._on_clip(job, k), clip_setup=clip_setup)
        finally:
            self.job = None
            if clip_setup is not None:
                clip_setup.restore()
