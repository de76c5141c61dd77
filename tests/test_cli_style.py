"""One flag style across the commands: ``--snake_case`` listed, the dashed spellings still read (unlisted);
every entry point's ``--help`` exits 0 and, where the command takes a config, lists its fields; ``data build --pad_mode mix``; ``python -m bench``
writes to a work directory unless ``--update_docs``."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from svi_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_dashed_flags_are_read_as_snake_case():
    assert cli.snake_case_argv(["--num-frames", "5", "--pad-mode=mix", "pos-arg", "-x", "--out", "a-b",
                                "--", "--keep-me"]) == \
        ["--num_frames", "5", "--pad_mode=mix", "pos-arg", "-x", "--out", "a-b", "--", "--keep-me"]
    p = cli.ArgumentParser()
    p.add_argument("--num_frames", type=int)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("build-it")
    s.add_argument("--min_size", type=int)
    a = p.parse_args(["--num-frames", "3", "build-it", "--min-size=7"])
    assert (a.num_frames, a.cmd, a.min_size) == (3, "build-it", 7)
    assert "--num-frames" not in p.format_help() and "--num_frames" in p.format_help()


def _argparse_flags(path):
    return re.findall(r'add_argument\(\s*"(--[^"]+)"', open(path).read())


def test_every_command_lists_snake_case_flags():
    files = []
    for d in ("svi_jax", "bench", "convert"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, d)):
            files += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    dashed = {os.path.relpath(f, ROOT): [x for x in _argparse_flags(f) if "-" in x[2:]] for f in files}
    assert not {f: v for f, v in dashed.items() if v}


def test_data_help_and_pad_modes():
    r = subprocess.run([sys.executable, "-m", "svi_jax.data", "cache", "--help"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "{ref,zero,mix}" in r.stdout and "--pad_mode" in r.stdout and "--pad-mode" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "svi_jax.data", "build", "--help"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--overwrite" in r.stdout and "--min_frames" in r.stdout, r.stderr[-2000:]


# every entry point: (argv after python, whether it takes a config)
ENTRY_POINTS = [
    (["-m", "svi_jax.train"], True), (["-m", "svi_jax.sample"], True), (["-m", "svi_jax.demo"], True),
    (["-m", "svi_jax.plan"], True), (["-m", "svi_jax.pro_plan"], True), (["-m", "svi_jax.data", "cache"], True),
    (["-m", "svi_jax.data"], False), (["-m", "svi_jax.experiments.drift"], True),
    (["-m", "svi_jax.experiments.caption_probe"], False), (["-m", "svi_jax.experiments.dance_strip"], False),
    (["-m", "svi_jax.experiments.tiny_strip"], False),
    (["-m", "svi_jax.eval.drift"], False), (["-m", "bench"], False), (["convert/from_torch.py"], False),
]


@pytest.mark.parametrize("argv,takes_config", ENTRY_POINTS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_help_exits_0_and_lists_the_config_fields(argv, takes_config):
    r = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout.lower()
    if takes_config:
        assert "--config" in r.stdout and "config fields" in r.stdout and "cannot load" not in r.stdout
        assert "--config.train.num_steps=" in r.stdout and "--config.data.num_frames=17" in r.stdout   # tiny's values


def test_bench_writes_a_work_directory_unless_update_docs(tmp_path, monkeypatch):
    sys.path.insert(0, ROOT)
    import bench.__main__ as B

    def fake_entries(names, quick, jobs):
        for n in names:
            yield n, {"status": "ok", "rows": []}

    monkeypatch.setattr(B, "_entries", fake_entries)
    written = []
    monkeypatch.setattr(B, "write_doc", lambda path, table: written.append(path))
    monkeypatch.setattr(B, "refresh_rows", lambda results: None)
    monkeypatch.chdir(tmp_path)
    before = open(B.RESULTS).read(), open(B.DOC).read()
    assert B.main(["--quick", "--only", "erft_banks"]) == 0
    assert os.path.isfile(tmp_path / "runs" / "bench" / "results.json")
    assert written == [os.path.join("runs", "bench", "benchmarks.md")]
    assert (open(B.RESULTS).read(), open(B.DOC).read()) == before          # the tracked files are untouched
    monkeypatch.setattr(B, "RESULTS", str(tmp_path / "tracked.json"))
    monkeypatch.setattr(B, "DOC", str(tmp_path / "tracked.md"))
    assert B.main(["--quick", "--only", "erft_banks", "--update_docs"]) == 0
    assert os.path.isfile(tmp_path / "tracked.json") and written[-1] == str(tmp_path / "tracked.md")
