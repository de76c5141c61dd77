"""A live web demo of long-video sampling: ``python -m svi_jax.demo --config configs/tiny.py``.

* :mod:`svi_jax.demo.validate` -- the checks of what a browser sends (image type and size, prompt stream, clip
  count, seed), each failing with one clear message;
* :mod:`svi_jax.demo.jobs` -- jobs, the one-at-a-time queue and the runner that drives
  :func:`svi_jax.sample.generate` (the CLI's code path: same clips, files and ``--resume`` state) with a per-clip
  callback;
* :mod:`svi_jax.demo.app` -- the Starlette app (JSON API, server-sent events, the static page);
* :mod:`svi_jax.demo.__main__` -- the command line (uvicorn on 127.0.0.1 by default).

See ``docs/demo.md``.
"""
