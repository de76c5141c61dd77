"""The web demo without a browser: input validation, the one-at-a-time queue with stop/resume, and the HTTP API
(Starlette's test client) on a stand-in runner. The real runner (svi_jax.sample.generate on the tiny model) is driven
from a real browser in tests/test_demo_browser.py."""
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")

from svi_jax.demo import validate  # noqa: E402
from svi_jax.demo.jobs import Job, JobQueue, QueueFull, StopRequested  # noqa: E402

LIMITS = validate.Limits(max_image_bytes=200_000, max_image_pixels=1_000_000, min_image_side=16,
                         max_prompt_chars=50, max_prompt_stream_chars=2000, max_clips=5)


def image_bytes(w=64, h=48, fmt="PNG", mode="RGB", noise=True) -> bytes:
    a = (np.random.default_rng(0).random((h, w, 3)) * 255 * noise).astype(np.uint8)
    img = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ validation


def test_images_accepted_and_refused():
    assert validate.check_image(image_bytes(), LIMITS) == "png"
    assert validate.check_image(image_bytes(fmt="JPEG"), LIMITS) == "jpg"
    assert validate.check_image(image_bytes(fmt="WEBP"), LIMITS) == "webp"
    cases = [
        (b"", 400, "no reference image"),
        (b"%PDF-1.4 not an image at all" * 10, 415, "not an image file"),
        (image_bytes(fmt="ICO"), 415, "is a ICO image; accepted: BMP, GIF, JPEG, PNG, TIFF, WEBP"),
        (image_bytes(1200, 900, noise=False), 413, "1200x900 = 1.1 MP, above the limit of 1.0 MP"),
        (image_bytes(64, 8), 400, "64x8: both sides must be at least 16 px"),
        (image_bytes()[:300], 400, "damaged or truncated"),
        (b"\x89PNG" + bytes(300_000), 413, "above the limit of 0.2 MB"),
    ]
    for data, status, text in cases:
        with pytest.raises(validate.InputError) as e:
            validate.check_image(data, LIMITS, "the image 'x'")
        assert e.value.status == status, (text, str(e.value))
        assert text in str(e.value)


def test_prompt_streams():
    assert validate.check_prompts("a cat\n\n# a comment\r\na dog\n", LIMITS) == ["a cat", "a dog"]
    assert validate.check_prompts('prompts = ["one", "two"]', LIMITS) == ["one", "two"]
    for text, msg in [("", "no prompts: type one prompt per line"), (" \n\n", "no prompts"),
                      ("# only a comment", "no prompts"),
                      ("ok\n" + "x" * 51, "prompt 2 is 51 characters, above the limit of 50"),
                      ("\n".join("p%d" % i for i in range(6)), "6 prompts, above the limit of 5 clips"),
                      ('prompts = ["a", 3]', "item 1 is a int"),
                      ("y" * 2001, "the prompt stream is 2001 characters")]:
        with pytest.raises(validate.InputError, match=msg):
            validate.check_prompts(text, LIMITS)


def test_clip_counts_and_seeds():
    assert validate.clip_prompts(["a", "b"], 0, LIMITS) == ["a", "b"]
    assert validate.clip_prompts(["a", "b"], 5, LIMITS) == ["a", "b", "a", "b", "a"]
    with pytest.raises(validate.InputError, match="clips must be at most 5, got 6"):
        validate.clip_prompts(["a"], 6, LIMITS)
    assert validate.check_int("", "seed", 0, 9, 7) == 7
    assert validate.check_int(" 4 ", "seed", 0, 9, 7) == 4
    with pytest.raises(validate.InputError, match="seed must be a whole number, got '1.5'"):
        validate.check_int("1.5", "seed", 0, 9, 0)
    with pytest.raises(validate.InputError, match=r"seed must be in 0..9, got -1"):
        validate.check_int("-1", "seed", 0, 9, 0)


# ------------------------------------------------------------------------------------------------ queue


class FakeRunner:
    """Stands in for the sampler: one 'clip' per prompt, each waiting for the test to release it."""

    def __init__(self, fail_on=None):
        self.active, self.max_active, self.order = 0, 0, []
        self.release = threading.Semaphore(0)
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, job):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append((job.id, job.resume))
        try:
            for k in range(len(job.clips), len(job.prompts)):
                while not self.release.acquire(timeout=0.01):
                    if job.stop_event.is_set():
                        raise StopRequested(job.id)
                if job.prompts[k] == self.fail_on:
                    raise RuntimeError("the clip blew up")
                job.add_clip({"clip": k, "prompt": job.prompts[k]})
        finally:
            with self.lock:
                self.active -= 1


def wait_for(cond, timeout=10.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def make_job(tmp_path, prompts=("a", "b")):
    return Job(str(tmp_path), list(prompts), 0, "reference.png")


def test_one_job_at_a_time_in_order_and_a_bounded_queue(tmp_path):
    runner = FakeRunner()
    q = JobQueue(lambda: runner, max_queued=2)
    try:
        jobs = [make_job(tmp_path) for _ in range(3)]
        assert q.submit(jobs[0]) == 0
        wait_for(lambda: jobs[0].status == "running")
        assert [q.submit(j) for j in jobs[1:]] == [0, 1]
        with pytest.raises(QueueFull, match="the queue is full"):
            q.submit(make_job(tmp_path))
        assert q.position(jobs[2]) == 1
        for _ in range(6):
            runner.release.release()
        wait_for(lambda: all(j.status == "done" for j in jobs))
        assert runner.max_active == 1
        assert [o[0] for o in runner.order] == [j.id for j in jobs]
        assert [len(j.clips) for j in jobs] == [2, 2, 2]
        # the queued job's events said where it stood, then that it moved up
        positions = [e["data"].get("position") for e in jobs[2].events_since(0)
                     if e["event"] == "status" and e["data"]["status"] == "queued"]
        assert positions[:1] == [1] and 0 in positions
    finally:
        q.close()


def test_stop_and_resume(tmp_path):
    runner = FakeRunner()
    q = JobQueue(lambda: runner, max_queued=2)
    try:
        running, waiting = make_job(tmp_path), make_job(tmp_path)
        q.submit(running)
        q.submit(waiting)
        wait_for(lambda: running.status == "running")
        runner.release.release()                        # clip 1 of 2 finishes
        wait_for(lambda: len(running.clips) == 1)
        q.stop(waiting)                                 # a queued job leaves the queue at once
        assert waiting.status == "stopped" and q.position(waiting) is None
        q.stop(running)                                 # the running one at its next step
        wait_for(lambda: running.status == "stopped")
        assert len(running.clips) == 1
        with pytest.raises(ValueError, match="only a queued or running job can be stopped"):
            q.stop(running)
        with pytest.raises(ValueError, match="only a stopped or failed job can be resumed"):
            q.resume(make_job(tmp_path))
        q.resume(running)
        wait_for(lambda: running.status == "running")
        runner.release.release()
        wait_for(lambda: running.status == "done")
        assert [c["clip"] for c in running.clips] == [0, 1]
        assert runner.order == [(running.id, False), (running.id, True)]     # never ran the stopped queued job
        statuses = [e["data"]["status"] for e in running.events_since(0) if e["event"] == "status"]
        assert statuses == ["queued", "running", "stopping", "stopped", "queued", "running", "done"]
    finally:
        q.close()


def test_a_failing_job_is_reported_and_the_queue_goes_on(tmp_path):
    runner = FakeRunner(fail_on="boom")
    q = JobQueue(lambda: runner)
    try:
        bad, good = make_job(tmp_path, ["ok", "boom"]), make_job(tmp_path, ["fine"])
        q.submit(bad)
        q.submit(good)
        for _ in range(3):
            runner.release.release()
        wait_for(lambda: good.status == "done")
        assert bad.status == "failed" and bad.error == "RuntimeError: the clip blew up"
        assert len(bad.clips) == 1
    finally:
        q.close()


def test_models_that_fail_to_load_fail_every_job(tmp_path):
    def broken():
        raise FileNotFoundError("ckpt/dit does not exist")

    q = JobQueue(broken)
    try:
        job = make_job(tmp_path)
        wait_for(lambda: q.load_error is not None)
        q.submit(job)
        wait_for(lambda: job.status == "failed")
        assert job.error == "loading the models failed: ckpt/dit does not exist"
        assert not q.ready
    finally:
        q.close()


# ------------------------------------------------------------------------------------------------ HTTP API


@pytest.fixture
def client(tmp_path):
    from starlette.testclient import TestClient

    from svi_jax.demo.app import create_app

    runner = FakeRunner()
    q = JobQueue(lambda: runner, max_queued=1)
    app = create_app(q, str(tmp_path), LIMITS, {"config": "fake"})
    with TestClient(app) as c:
        c.runner, c.queue, c.workdir = runner, q, str(tmp_path)
        yield c
    q.close()


def post_job(client, image=None, prompts="a\nb", **fields):
    files = {"image": ("ref.png", image if image is not None else image_bytes(), "image/png")}
    return client.post("/api/jobs", files=files, data={"prompts": prompts, **fields})


def test_api_refuses_bad_input_with_one_message(client):
    for kwargs, status, msg in [
        ({"image": b"GIF89a not really"}, 415, "the image 'ref.png' is not an image file"),
        ({"prompts": ""}, 400, "no prompts"),
        ({"num_clips": "9"}, 400, "clips must be in 0..5, got 9"),
        ({"seed": "x"}, 400, "seed must be a whole number"),
        ({"image": bytes(300_000)}, 413, "above the limit of 0.2 MB"),
    ]:
        r = post_job(client, **kwargs)
        assert r.status_code == status, r.text
        assert msg in r.json()["error"]
    r = client.post("/api/jobs", data={"prompts": "a"})
    assert r.status_code == 400 and "no reference image" in r.json()["error"]
    r = client.post("/api/jobs", content=b"x" * 10, headers={"content-length": str(10 ** 9),
                                                              "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "above the limit" in r.json()["error"]
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.post("/api/jobs/nope/stop").json() == {"error": "no job 'nope'"}
    assert client.get("/api/jobs").json() == []


def test_api_runs_queues_stops_and_resumes(client):
    assert client.get("/api/info").json()["limits"]["max_clips"] == 5
    assert "<title>svi-jax live demo</title>" in client.get("/").text
    assert client.get("/static/demo.js").status_code == 200
    first = post_job(client, num_clips="3", seed="5").json()
    assert first["prompts"] == ["a", "b", "a"] and first["seed"] == 5
    wait_for(lambda: client.get(f"/api/jobs/{first['id']}").json()["status"] == "running")
    second = post_job(client)
    assert second.status_code == 201 and client.get(f"/api/jobs/{second.json()['id']}").json()["position"] == 0
    third = post_job(client)
    assert third.status_code == 429 and "queue is full" in third.json()["error"]
    assert client.post(f"/api/jobs/{first['id']}/resume").status_code == 409
    assert client.post(f"/api/jobs/{second.json()['id']}/stop").json()["status"] == "stopped"   # was queued
    assert client.post(f"/api/jobs/{first['id']}/stop").json()["status"] == "stopping"
    wait_for(lambda: client.get(f"/api/jobs/{first['id']}").json()["status"] == "stopped")
    assert client.post(f"/api/jobs/{first['id']}/resume").json()["status"] == "queued"
    for _ in range(3):
        client.runner.release.release()
    wait_for(lambda: client.get(f"/api/jobs/{first['id']}").json()["status"] == "done")
    assert client.get(f"/api/jobs/{first['id']}").json()["done"] == 3
    assert client.get(f"/api/jobs/{first['id']}/video.mp4").status_code == 404     # the fake writes no video


def test_api_takes_a_schedule_validated_as_the_cli_does(client):
    r = post_job(client, prompts="", schedule='{"prompt": "x"}\n{"prompt": "y", "seed": 3, "steps": 2}\n')
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["prompts"] == ["x", "y"]
    saved = json.load(open(os.path.join(client.workdir, "jobs", job["id"], "job.json")))
    assert saved["schedule"].startswith('{"prompt": "x"}')           # the runner re-reads it (and on resume)
    r = post_job(client, prompts="", num_clips="1", schedule="- prompt: only the first\n- prompt: second\n")
    assert r.status_code == 201 and r.json()["prompts"] == ["only the first"]
    for kwargs, msg in [
        ({"schedule": '{"prompt": "x"}\n{"prompt": "y", "cfg_scale": "high"}'}, "line 2, field 'cfg_scale'"),
        ({"schedule": '{"prompt": "x", "keyframe": "end.png"}'}, "keyframes are not supported"),
        ({"schedule": '{"prompt": "x", "loras": [{"path": "/etc/passwd"}]}'}, "not available in the demo"),
        ({"schedule": '{"prompt": "x"}', "prompts": "a"}, "either a prompt stream or a schedule"),
        ({"schedule": '{"prompt": "x"}', "prompts": "", "num_clips": "2"}, "the schedule has 1 clips"),
    ]:
        kwargs.setdefault("prompts", "")
        r = post_job(client, **kwargs)
        assert r.status_code == 400 and msg in r.json()["error"], r.text


def test_stacked_loras_are_recorded_as_the_sample_cli_does(tmp_path):
    """``--lora A --lora B:0.5`` in the demo: both files, in order, with their strengths and hashes (the settings a
    job stores and ``--resume`` checks), the same records as ``python -m svi_jax.sample`` writes."""
    import hashlib
    from types import SimpleNamespace

    from svi_jax import sample
    from svi_jax.demo.__main__ import run_inputs

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    got = run_inputs(SimpleNamespace(lora=[str(a), f"{b}:0.5"], lora_scale=1.0))["lora"]
    assert [(r["path"], r["strength"]) for r in got] == [(str(a), 1.0), (str(b), 0.5)]
    assert got[1]["sha256"] == hashlib.sha256(b"second").hexdigest()
    assert got == sample.lora_records([str(a), f"{b}:0.5"], 1.0)
    one = run_inputs(SimpleNamespace(lora=[str(a)], lora_scale=1.0))["lora"]
    assert one == {"path": str(a), "sha256": hashlib.sha256(b"first").hexdigest()}   # one LoRA: as before
