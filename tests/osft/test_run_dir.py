"""The run directory's state in the `osft` training loop, on a tiny model: resuming under a changed
config, the run lock, fresh runs over old checkpoints, the metrics log's rewrite, checkpoint order
and corruption, unwritable locations, diverged weights, and up-front validation of the config."""
import builtins
import errno
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers.runs import base_overrides
from helpers.tiny_lm import arithmetic_rows, write_rows
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from osft.cli import main as cli_main
from osft.config import ConfigError, load_config
from osft.model import load_causal_lm
from osft.run_dir import Checkpoints, RunError, drop_logged_after
from osft.train import train


def overrides(model_dir, data_file, run_dir, *extra, recipe="sft"):
    return [*base_overrides(model_dir, data_file, run_dir, recipe), *extra]


def run(model_dir, data_file, run_dir, *extra, recipe="sft"):
    return train(load_config(None, overrides(model_dir, data_file, run_dir, *extra, recipe=recipe)), progress=False)


def logged(run_dir, key="step"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# 1. resuming under a changed config

def test_resume_refuses_a_changed_training_config_naming_the_keys(tmp_path, model_dir, data_file, capsys):
    run_dir, data = tmp_path / "run", write_rows(tmp_path / "data.jsonl", arithmetic_rows())
    run(model_dir, data, run_dir, "max_steps=2", "save_every=1")
    with pytest.raises(RunError, match=r"step-000002 was trained with a different config \(max_steps: 2 -> 4; "
                                       r"optim.lr: 0.001 -> 0.01; seed: 0 -> 1\).*resume_changed=allow"):
        run(model_dir, data, run_dir, "max_steps=4", "optim.lr=1e-2", "seed=1")
    write_rows(data, arithmetic_rows(20))  # the same file name with other rows
    with pytest.raises(RunError, match=r"data.train \(sha256 of the file\)"):
        run(model_dir, data, run_dir, "max_steps=2")
    write_rows(data, arithmetic_rows())
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()  # a refused resume leaves the record alone
    # keys that do not change what is trained may change (the run is complete, so nothing more happens)
    run(model_dir, data, run_dir, "max_steps=2", "save_every=2", "log_every=5", "keep_last=3", "eval.every=7",
        "optim.micro_batch_tokens=32", "model.backend=reference")
    assert logged(run_dir) == [1, 2]
    # the CLI reports the refusal without a traceback
    assert cli_main(["train", "/dev/null", "--no-progress", *overrides(model_dir, data, run_dir, "optim.lr=1e-2",
                                                                       "max_steps=2")]) == 2
    assert "osft: run_dir" in capsys.readouterr().err


def test_an_allowed_config_change_applies_the_new_lr_and_is_recorded(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    run(model_dir, data_file, run_dir, "max_steps=2", "save_every=1")
    with pytest.warns(UserWarning, match="resuming .*step-000002 with a changed config"):
        assert cli_main(["train", "/dev/null", "--no-progress", "--allow-config-change",
                         *overrides(model_dir, data_file, run_dir, "max_steps=4", "optim.lr=1e-2")]) == 0
    assert logged(run_dir, "lr") == [1e-3, 1e-3, 1e-2, 1e-2]
    dcp_to_torch_save(run_dir / "checkpoints" / "step-000004" / "optimizer", tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert {group["initial_lr"] for group in state["param_groups"]} == {1e-2}
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "checkpoint": "step-000002",
                        "changes": {"max_steps": [2, 4], "optim.lr": [1e-3, 1e-2]}}]
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# 2. one run per run directory

def test_a_second_run_into_a_locked_run_dir_is_refused(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = json.dumps({"pid": os.getppid(), "host": socket.gethostname()})  # a live process on this host
    (run_dir / "run.lock").write_text(owner)
    with pytest.raises(RunError, match=f"in use by process {os.getppid()} on {socket.gethostname()}"):
        run(model_dir, data_file, run_dir, "max_steps=1")
    assert (run_dir / "run.lock").read_text() == owner and not (run_dir / "metrics.jsonl").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (run_dir / "run.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=f"taking over .*run.lock of process {dead}"):
        run(model_dir, data_file, run_dir, "max_steps=1")
    assert logged(run_dir) == [1] and not (run_dir / "run.lock").exists()


# ---------------------------------------------------------------------------------------------
# 3. a fresh run does not mix with an older run's checkpoints

def test_a_fresh_run_refuses_a_run_dir_holding_checkpoints(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    run(model_dir, data_file, run_dir, "max_steps=2", "save_every=1", "keep_last=5")
    before = checkpoint_names(run_dir)
    with pytest.raises(RunError, match=r"holds checkpoints of an earlier run \(resume: never\).*delete "
                                       r".*checkpoints to start afresh"):
        run(model_dir, data_file, run_dir, "max_steps=3", "save_every=1", "keep_last=1", "resume=never")
    assert checkpoint_names(run_dir) == before == ["step-000001", "step-000002"] and logged(run_dir) == [1, 2]


# ---------------------------------------------------------------------------------------------
# 4. the metrics log

def _lines(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)


def test_the_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(1, 2, 3, 4))
    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and str(tmp_path) in str(file) else handle

    monkeypatch.setattr(builtins, "open", full_disk_open)
    monkeypatch.setattr(io, "open", full_disk_open)
    with pytest.raises(OSError, match="No space left"):
        drop_logged_after(path, 2)
    monkeypatch.undo()
    assert path.read_text() == _lines(1, 2, 3, 4)  # the history survives a failed rewrite
    drop_logged_after(path, 2)
    assert path.read_text() == _lines(1, 2)


def test_a_torn_last_line_is_dropped_and_a_bad_line_elsewhere_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(1, 2, 3) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropping its torn last line 4"):
        drop_logged_after(path, 3)
    assert path.read_text() == _lines(1, 2, 3)
    path.write_text(_lines(1) + "garbage\n" + _lines(3))
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not a JSON object with a step"):
        drop_logged_after(path, 3)


# ---------------------------------------------------------------------------------------------
# 5. checkpoint order and corruption

def test_checkpoints_are_ordered_by_step_number(tmp_path, model_dir, data_file):
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    for name in ("step-999998", "step-999999", "step-1000000"):
        (checkpoints.root / name).mkdir(parents=True)
    assert checkpoints.latest().name == "step-1000000"
    config = load_config(None, overrides(model_dir, data_file, tmp_path))
    lm = load_causal_lm(config.model, torch.device("cpu"))
    optimizer = torch.optim.AdamW(lm.model.parameters())
    checkpoints.save(lm, optimizer, 1000001, 0, 0, config, "digest")
    assert [p.name for p in checkpoints.all()] == ["step-1000000", "step-1000001"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    settings = ["max_steps=3", "save_every=1", "keep_last=5"]
    run(model_dir, data_file, run_dir, *settings)
    (run_dir / "checkpoints" / "step-000003" / "trainer_state.pt").write_bytes(b"")
    with open(run_dir / "metrics.jsonl", "a") as f:  # and a write cut short
        f.write('{"step": 4, "lo')
    with pytest.warns(UserWarning) as warned:
        run(model_dir, data_file, run_dir, *settings)
    messages = "\n".join(str(w.message) for w in warned)
    assert "step-000003 does not load (EOFError" in messages and "dropping its torn last line 4" in messages
    assert logged(run_dir) == [1, 2, 3]
    assert checkpoint_names(run_dir) == ["step-000001", "step-000002", "step-000003", "step-000003.corrupt"]


# ---------------------------------------------------------------------------------------------
# 6. unwritable locations are found before any work

def test_unwritable_run_and_checkpoint_locations_are_reported_up_front(tmp_path, model_dir, data_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RunError, match=r"run_dir .*a-file/run is not a writable directory"):
        run(model_dir, data_file, blocker / "run", "max_steps=1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")  # checkpoints cannot go there
    with pytest.raises(RunError, match=r"checkpoint directory \(keep_last > 0\) .*run/checkpoints is not a writable"):
        run(model_dir, data_file, run_dir, "max_steps=1")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "run.lock").exists()


# ---------------------------------------------------------------------------------------------
# 7. diverged weights

def test_non_finite_weights_stop_the_run_naming_the_last_good_checkpoint(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    # lr * weight_decay overflows float32: the decayed weights become inf with finite gradients
    blow_up = ["optim.lr=1e4", "optim.weight_decay=1e40", "save_every=1", "keep_last=5", "max_steps=3"]
    with pytest.raises(FloatingPointError, match=r"step 1: the weights are not finite after the update "
                                                 r"\(lr 10000\); stopping \(last checkpoint: None\)"):
        run(model_dir, data_file, run_dir, *blow_up, recipe="osft")
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
    run_dir = tmp_path / "resumed"
    run(model_dir, data_file, run_dir, "max_steps=1", "save_every=1", recipe="osft")
    with pytest.raises(FloatingPointError, match=r"step 2: the weights are not finite .* \(last checkpoint: "
                                                 r".*step-000001\)"), pytest.warns(UserWarning):
        run(model_dir, data_file, run_dir, *blow_up, "resume_changed=allow", recipe="osft")
    assert checkpoint_names(run_dir) == ["step-000001"]


# ---------------------------------------------------------------------------------------------
# 8. up-front validation

@pytest.mark.parametrize("override,message", [
    ("optim.beta1=1.5", r"optim.beta1 must be in \[0, 1\), got 1.5"),
    ("optim.beta2=1", r"optim.beta2 must be in \[0, 1\), got 1.0"),
    ("rollout.top_p=2", r"rollout.top_p must be in \(0, 1\], got 2.0"),
    ("seed=4294967296", r"seed must be in \[0, 2\*\*32\)"),
    ("rollout.vllm_memory_fraction=1.5", r"rollout.vllm_memory_fraction must be in \(0, 1\]"),
    ("pear.gamma=1.5", r"pear.gamma must be in \(0, 1\], got 1.5"),
    ("grpo.clip_low=1", r"grpo.clip_low must be in \[0, 1\), got 1.0"),
    ("recipe=grpo grpo.num_generations=1", r"grpo.num_generations must be >= 2 .* got 1"),
])
def test_values_outside_their_range_are_refused_with_the_key(tmp_path, model_dir, data_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*overrides(model_dir, data_file, tmp_path), *override.split()])


def test_paths_expand_home_and_environment_variables(tmp_path, model_dir, data_file, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OSFT_TEST_RUNS", "runs")
    config = load_config(None, overrides(model_dir, data_file, "~/$OSFT_TEST_RUNS/x"))
    assert config.run_dir == f"{tmp_path}/runs/x"


def test_demo_difficulty_is_bounded(capsys):
    from osft.demo import DemoSettings
    from osft.demo import main as demo_main
    from osft.tasks import generate_task

    with pytest.raises(ValueError, match=r"--difficulty must be in \[0, 20\], got 3000"):
        DemoSettings(difficulty=3000)
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--difficulty", "21"])
    assert exit_info.value.code == 2 and "--difficulty must be in [0, 20], got 21" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"difficulty must be in \[0, 20\]"):
        generate_task(difficulty=3000)


def test_sequences_beyond_the_position_limit_are_refused_up_front(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    # the tiny model has 128 positions; its prompts are about 10 tokens
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens \+ rollout.max_new_tokens: prompts of up to \d+ "
                                          r"tokens .* plus 200 response tokens exceed the model's position limit "
                                          r"\(max_position_embeddings=128"):
        run(model_dir, data_file, run_dir, "max_steps=1", "rollout.max_new_tokens=200", recipe="osft")
    long_prompts = write_rows(tmp_path / "long.jsonl", [{**row, "prompt": "what is 1 plus 2 ? " * 30}
                                                        for row in arithmetic_rows()])
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens \+ data.max_response_tokens: prompts of up to "
                                          r"\d+ tokens \(in .*long.jsonl\)"):
        run(model_dir, long_prompts, run_dir, "max_steps=1")
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens: prompts of up to \d+ tokens \(in .*long.jsonl"):
        run(model_dir, data_file, run_dir, "max_steps=1", f"eval.data={long_prompts}")
    assert not (run_dir / "metrics.jsonl").exists()
    # truncating the prompts makes the same data fit
    run(model_dir, long_prompts, run_dir, "max_steps=1", "data.max_prompt_tokens=64")
    assert logged(run_dir) == [1]


def test_every_kl_estimator_of_the_losses_is_a_config_choice():
    import typing

    from osft.config import GRPOConfig, load_config
    from osft_kernels.losses import KL_ESTIMATORS

    assert typing.get_args(GRPOConfig.__annotations__["kl_estimator"]) == KL_ESTIMATORS
    config = load_config(None, ["model.path=smollm2-135m", "data.train=x.jsonl", "grpo.kl_estimator=low_var_kl"])
    assert config.grpo.kl_estimator == "low_var_kl"
