"""The benchmark harness and its report, run end to end on tiny shapes (``BENCH_SMOKE=1``), so that
``make bench`` keeps working; the real CPU numbers are in ``benchmarks/results/cpu.md``."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_harness_and_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(BENCH_SMOKE="1", BENCH_ROUNDS="1")
    results = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-rs",
                          "-p", "no:cacheprovider", f"--benchmark-json={results}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ours_triton: the triton backend runs on CUDA tensors" in run.stdout  # skipped, with the reason
    benchmarks = json.loads(results.read_text())["benchmarks"]
    groups = {b["group"] for b in benchmarks}
    assert "ce N=256 D=64 V=1000 float32" in groups and "ce N=256 D=64 V=3001 float32" in groups
    assert all(b["extra_info"]["peak_bytes"] > 0 and "mismatch" not in b["extra_info"] for b in benchmarks)

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, "-m", "benchmarks.report", str(results), "--out", str(out),
                             "--name", "smoke"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    markdown = (out / "smoke.md").read_text()
    assert "## ce: N=256, D=64, V=1000, float32" in markdown and "| naive | " in markdown
    assert "| ours_torch | " in markdown and "| trl | " in markdown and "Not run: " in markdown
    assert (out / "smoke.png").stat().st_size > 0 and (out / "smoke.json").exists()
