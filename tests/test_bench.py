"""The benchmark harness: a ``--quick`` run of one cheap benchmark writes valid JSON and the table.

No timing assertions: the numbers of a quick run mean nothing (and the machine is shared). The parity the DiT
benchmark checks before timing (loss and LoRA gradients vs diffusers + PEFT) is a unit test,
``tests/test_grads.py::test_dit_lora_grads_match_torch_autograd``; every benchmark's quick run stays one command
(``python -m bench --quick --fresh --jobs 2``), not part of the default suite (it oversubscribed the 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import interleaved  # noqa: E402
from bench.__main__ import BEGIN, BENCHMARKS, END, table_md, write_doc  # noqa: E402

ROW_KEYS = {"benchmark", "ours", "reference", "ratio", "goal", "pass", "why"}
SMOKE = "erft_banks"    # the cheapest benchmark with a module (a few seconds quick)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out, doc = str(d / "results.json"), str(d / "benchmarks.md")
    with open(doc, "w") as f:
        f.write("# Benchmarks\n\nhand-written notes stay.\n")
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--fresh", "--only", SMOKE, "--out", out,
                          "--doc", doc], cwd=REPO, capture_output=True, text=True, timeout=600)
    return res, out, doc


def test_quick_run_writes_valid_json(quick_run):
    res, out, _ = quick_run
    with open(out) as f:
        results = json.load(f)
    errors = {n: e.get("error", "")[-1500:] for n, e in results["benchmarks"].items() if e["status"] == "error"}
    assert not errors, f"benchmarks failed: {errors}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(results["benchmarks"]) == {SMOKE}
    assert results["machine"]["cores"] >= 1 and results["machine"]["jax"] not in ("", "not installed")
    for name, e in results["benchmarks"].items():
        assert e["quick"] is True and e["status"] in ("ok", "not available"), name
        assert e["rows"], name
        for r in e["rows"]:
            assert ROW_KEYS <= set(r), (name, r)
            assert r["ratio"] is None or (isinstance(r["ratio"], float) and r["ratio"] >= 0), (name, r)
            assert r["pass"] in (True, False, None), (name, r)


def test_table_written_between_markers_keeping_the_rest(quick_run):
    _, out, doc = quick_run
    text = open(doc).read()
    assert text.startswith("# Benchmarks\n\nhand-written notes stay.")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    table = text[text.index(BEGIN): text.index(END)]
    assert "| benchmark | ours | reference | ratio | goal | pass |" in table
    results = json.load(open(out))
    for e in results["benchmarks"].values():
        for r in e["rows"]:
            assert r["benchmark"].replace("|", "\\|") in table
    for name in set(BENCHMARKS) - {SMOKE}:                    # the others: a 'not run' row naming the command
        assert f"run `python -m bench --only {name}`" in table
    # regenerating replaces the table in place
    write_doc(doc, table_md(results))
    assert open(doc).read() == text


def test_interleaved_runs_round_robin_in_rotating_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    t = interleaved(fns, reps=5, warmup=2)
    assert calls == ["a", "b", "c"] * 2 + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    for n in "abc":
        assert len(t[n]["times"]) == 5 and t[n]["min"] <= t[n]["median"] <= t[n]["max"]
    assert set(t["_pairs"]) == {"b", "c"}


def test_missing_module_gives_a_not_available_row(monkeypatch):
    from bench import __main__ as m

    monkeypatch.setitem(m.BENCHMARKS, "nope", ("no_such_bench", None, "9. something"))
    e = m.run_one("nope", quick=True)
    assert e["status"] == "not available"
    assert e["rows"][0]["ours"] == "not available" and "no_such_bench" in e["rows"][0]["why"]
