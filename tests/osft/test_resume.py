"""Resuming a killed run gives bitwise the weights of a run that was never interrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.runs import base_overrides, final_weights, read_metrics


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, model_dir, data_file):
    """OSFT (sampling, so the RNG state must be restored too): kill -9 a run after its second
    checkpoint, resume it, and compare with a run that was never interrupted."""
    steps = 6
    common = [*base_overrides(model_dir, data_file, tmp_path / "killed"), f"max_steps={steps}", "save_every=1",
              "keep_last=10", "optim.schedule=cosine", "optim.warmup_steps=2"]
    command = [sys.executable, "-m", "osft", "train", "--no-progress", "/dev/null", *common]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    checkpoints = tmp_path / "killed" / "checkpoints"
    while not (checkpoints / "step-000002").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no second checkpoint within 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
    assert done and done[-1] != f"step-{steps:06d}", f"the run finished before it was killed: {done}"

    subprocess.run(command, check=True, capture_output=True, timeout=600)
    uninterrupted = [*common, f"run_dir={tmp_path / 'straight'}"]  # the later value wins
    subprocess.run([sys.executable, "-m", "osft", "train", "--no-progress", "/dev/null", *uninterrupted],
                   check=True, capture_output=True, timeout=600)
    resumed, straight = final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == list(range(1, steps + 1))
