"""``python -m bench.device --tiny`` (the one-accelerator check at toy size) runs every part on a CPU and writes its
JSON and markdown; a measurement that fails is recorded as a failure, not a crash."""
import json
import subprocess
import sys

from tests.test_sharding import ROOT, _env


def test_device_check_runs_at_tiny_size(tmp_path):
    cmd = [sys.executable, "-m", "bench.device", "--tiny", "--remat", "save_attention", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["tiny"] and r["platform"] == "cpu"
    want = {"attention/per_head/forward", "attention/flash/forward_backward", "attention/xla/forward",
            "train_step/save_attention", "sample_step/batch2", "bank_insert/K8", "vae_encode/5x32x32"}
    assert want <= set(r["results"]), sorted(r["results"])
    failed = {k: v["error"] for k, v in r["results"].items() if v["status"] != "ok"}
    assert not failed, failed
    parity = {k: v["max_rel_err"] for k, v in r["results"].items() if k.startswith("parity/")}
    assert len(parity) == 3 and all(0 < e < 0.02 for e in parity.values()), parity   # bf16 against float32
    step = r["results"]["train_step/save_attention"]
    assert step["median_s"] > 0 and step["peak_gb"] > 0 and step["step_s_40_layers"] > step["median_s"]
    assert "| train_step/save_attention | ok |" in (tmp_path / "tiny.md").read_text()


def test_a_failing_measurement_is_recorded_not_raised():
    sys.path.insert(0, str(ROOT))
    from bench.device import guarded

    results = {}
    guarded("boom", lambda: (_ for _ in ()).throw(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")),
            results)
    assert results["boom"]["status"] == "failed" and results["boom"]["out_of_memory"]
    assert "RESOURCE_EXHAUSTED" in results["boom"]["error"]
