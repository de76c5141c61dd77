"""The demo's web app: a Starlette ASGI app with a small JSON API, server-sent events and one static page.

=======  =============================  ===========================================================================
GET      ``/``                          the page (``static/index.html`` + ``demo.js`` + ``demo.css``)
GET      ``/api/info``                  model, clip size, sampling settings, limits, whether the models are loaded
POST     ``/api/jobs``                  multipart form: ``image`` (file), ``prompts`` or ``schedule`` (text), ``num_clips``, ``seed``
GET      ``/api/jobs``, ``/api/jobs/ID``  the jobs / one job (status, clips with timings)
GET      ``/api/jobs/ID/events``        server-sent events: ``status``, ``step``, ``clip``, ``warning`` (replayed from
                                        the start, or from ``Last-Event-ID`` when the browser reconnects)
POST     ``/api/jobs/ID/stop|resume``   stop (at the next sampling step) / continue from the last finished clip
GET      ``/api/jobs/ID/video.mp4``     the stitched video so far; ``/api/jobs/ID/thumbs/K.png`` clip K's thumbnail
=======  =============================  ===========================================================================

Bad input is a JSON ``{"error": "..."}`` with a 4xx status (the page shows the message).
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from svi_jax.demo import validate
from svi_jax.demo.jobs import Job, JobQueue, QueueFull

STATIC = os.path.join(os.path.dirname(__file__), "static")
POLL_S = 0.2          # how often an event stream looks for new events
KEEPALIVE_S = 15.0    # a comment line this often keeps idle connections open through proxies


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(queue: JobQueue, workdir: str, limits: validate.Limits, info: Optional[dict] = None,
               max_seed: int = 2 ** 31 - 1) -> Starlette:
    """The app serving ``queue``'s jobs, stored under ``workdir/jobs/ID/``. ``info``: shown on the page."""
    jobs_dir = os.path.join(os.path.abspath(workdir), "jobs")
    os.makedirs(jobs_dir, exist_ok=True)
    info = dict(info or {})

    def job_or_404(request: Request) -> Job:
        job = queue.jobs.get(request.path_params["job_id"])
        if job is None:
            raise _NotFound(f"no job {request.path_params['job_id']!r}")
        return job

    async def index(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-cache"})

    async def get_info(request: Request) -> Response:
        return JSONResponse(dict(info, ready=queue.ready, load_error=queue.load_error, limits=limits.to_dict(),
                                 max_queued=queue.max_queued))

    async def create_job(request: Request) -> Response:
        size = request.headers.get("content-length")
        budget = limits.max_image_bytes + 4 * limits.max_prompt_stream_chars + 65536
        if size and size.isdigit() and int(size) > budget:
            return _error(f"the upload is {int(size) / 2 ** 20:.1f} MB, above the limit of "
                          f"{limits.max_image_bytes / 2 ** 20:.1f} MB for the image", 413)
        try:
            async with request.form(max_files=1, max_fields=8,
                                    max_part_size=4 * limits.max_prompt_stream_chars) as form:
                upload = form.get("image")
                data = await upload.read(limits.max_image_bytes + 1) if hasattr(upload, "read") else b""
                name = f"the image {upload.filename!r}" if getattr(upload, "filename", None) else "the image"
                ext = validate.check_image(data, limits, name)
                num_clips = validate.check_int(form.get("num_clips"), "clips", 0, limits.max_clips, 0)
                seed = validate.check_int(form.get("seed"), "seed", 0, max_seed, 0)
                schedule = validate.check_schedule(form.get("schedule"), limits,
                                                   validate.schedule_defaults(info, seed))
                if schedule is not None:            # a schedule instead of the prompt stream: one clip per record
                    if (form.get("prompts") or "").strip():
                        raise validate.InputError("give either a prompt stream or a schedule, not both")
                    schedule, prompts = schedule
                    clip_prompts = validate.schedule_clip_prompts(prompts, num_clips)
                else:
                    prompts = validate.check_prompts(form.get("prompts"), limits)
                    clip_prompts = validate.clip_prompts(prompts, num_clips, limits)
        except validate.InputError as e:
            return _error(str(e), e.status)
        except Exception as e:       # noqa: BLE001 -- a malformed form (multipart errors, too many fields)
            return _error(f"the form could not be read: {getattr(e, 'detail', None) or e}")
        if queue.load_error is not None:
            return _error(queue.load_error, 503)
        job = Job("", clip_prompts, seed, f"reference.{ext}", schedule=schedule)
        job.dir = os.path.join(jobs_dir, job.id)
        os.makedirs(job.dir)
        with open(job.image_path, "wb") as f:
            f.write(data)
        job.save()
        try:
            queue.submit(job)
        except QueueFull as e:
            return _error(str(e), 429)
        return JSONResponse(job.to_dict(), status_code=201)

    async def list_jobs(request: Request) -> Response:
        jobs = sorted(queue.jobs.values(), key=lambda j: j.created, reverse=True)
        return JSONResponse([j.to_dict() for j in jobs])

    async def get_job(request: Request) -> Response:
        job = job_or_404(request)
        return JSONResponse(dict(job.to_dict(), position=queue.position(job)))

    async def stop_job(request: Request) -> Response:
        job = job_or_404(request)
        try:
            queue.stop(job)
        except ValueError as e:
            return _error(str(e), 409)
        return JSONResponse(job.to_dict())

    async def resume_job(request: Request) -> Response:
        job = job_or_404(request)
        try:
            queue.resume(job)
        except ValueError as e:
            return _error(str(e), 409)
        except QueueFull as e:
            return _error(str(e), 429)
        return JSONResponse(job.to_dict())

    async def events(request: Request) -> Response:
        job = job_or_404(request)
        last = request.headers.get("last-event-id", "")
        cursor = int(last) + 1 if last.strip().isdigit() else 0

        async def stream():
            nonlocal cursor
            idle = 0.0
            yield "retry: 1000\n\n"
            while True:
                new = job.events_since(cursor)
                for ev in new:
                    yield f"id: {ev['id']}\nevent: {ev['event']}\ndata: {json.dumps(ev['data'])}\n\n"
                    cursor = ev["id"] + 1
                idle = 0.0 if new else idle + POLL_S
                if idle >= KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    idle = 0.0
                await asyncio.sleep(POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def video(request: Request) -> Response:
        job = job_or_404(request)
        if not os.path.isfile(job.out):
            return _error("no clip has finished yet", 404)
        return FileResponse(job.out, media_type="video/mp4", headers={"Cache-Control": "no-store"},
                            content_disposition_type="inline", filename=f"svi_{job.id}.mp4")

    async def thumb(request: Request) -> Response:
        job = job_or_404(request)
        path = job.thumb_path(request.path_params["k"])
        if not os.path.isfile(path):
            return _error(f"clip {request.path_params['k']} has no thumbnail", 404)
        return FileResponse(path, media_type="image/png")

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(str(exc), 404)

    routes = [
        Route("/", index),
        Route("/api/info", get_info),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/stop", stop_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/resume", resume_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/video.mp4", video),
        Route("/api/jobs/{job_id}/thumbs/{k:int}.png", thumb),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={_NotFound: not_found})


class _NotFound(Exception):
    pass


def load_jobs(queue: JobQueue, workdir: str) -> int:
    """Register the jobs a previous server left in ``workdir/jobs/`` (finished, or stopped and resumable)."""
    jobs_dir = os.path.join(os.path.abspath(workdir), "jobs")
    n = 0
    for name in sorted(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else []:
        if os.path.isfile(os.path.join(jobs_dir, name, "job.json")):
            try:
                queue.add(Job.load(os.path.join(jobs_dir, name)))
                n += 1
            except (OSError, ValueError, KeyError):
                continue
    return n
