"""The `osft` training loop on a tiny model built from a config: configuration errors, the sft and
osft recipes end to end, the loss going through the fused op exactly, micro-batching, and resuming a
killed run."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_lm import arithmetic_rows, build_tiny_model, write_rows
from torch import nn
from transformers import AutoModelForCausalLM

from osft.config import ConfigError, load_config
from osft.data import micro_batches, pack
from osft.model import load_causal_lm, output_head
from osft.recipes import make_recipe
from osft.train import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows())


def base_overrides(model_dir, data_file, run_dir, recipe="osft"):
    return [f"recipe={recipe}", f"model.path={model_dir}", f"data.train={data_file}", f"run_dir={run_dir}",
            "prompts_per_step=4", "rollout.max_new_tokens=8", "optim.lr=1e-3", "optim.micro_batch_tokens=64"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    latest = max((run_dir / "checkpoints").glob("step-*"))
    return AutoModelForCausalLM.from_pretrained(latest).state_dict()


# ---------------------------------------------------------------------------------------------
# configuration

@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", r"unknown key optim.lrr \(known keys of optim."),
    ("bogus=1", "unknown key bogus"),
    ("optim.lr=fast", "optim.lr must be a finite number, got 'fast'"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("recipe=dpo", r"recipe must be one of \['sft', 'osft'\]"),
    ("max_steps=-1", "max_steps must be >= 0"),
    ("model.gradient_checkpointing=yes please", "model.gradient_checkpointing must be true or false"),
    ("osft.tau_s_start=1.5", "OSFT needs tau_s <= tau_t"),
    ("optim=3", "optim must be a mapping"),
])
def test_bad_config_is_refused_with_the_key(tmp_path, model_dir, data_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), override])


def test_config_values_and_overrides(tmp_path, model_dir, data_file):
    (tmp_path / "c.yaml").write_text("recipe: sft\noptim:\n  lr: 2.0e-5\n  schedule: cosine\n")
    config = load_config(tmp_path / "c.yaml", [*base_overrides(model_dir, data_file, tmp_path, "sft")[1:],
                                                "optim.lr=1e-5", "model.gradient_checkpointing=true"])
    assert config.recipe == "sft" and config.optim.lr == 1e-5 and config.optim.schedule == "cosine"
    assert config.model.gradient_checkpointing is True and config.prompts_per_step == 4


def test_config_requires_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(None, ["data.train=x.jsonl"])
    (tmp_path / "c.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "c.yaml")


def test_cli_reports_bad_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: osft\noptim:\n  lr: -1\n")
    result = subprocess.run([sys.executable, "-m", "osft", "train", str(config)], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 2 and "osft: bad config: optim.lr must be > 0" in result.stderr


def test_peft_like_head_is_refused(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    class AdapterLinear(nn.Linear):
        pass

    model.lm_head = AdapterLinear(32, model.config.vocab_size, bias=False)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        output_head(model)


# ---------------------------------------------------------------------------------------------
# recipes end to end

@pytest.mark.parametrize("recipe", ["sft", "osft"])
def test_recipe_runs_and_logs(tmp_path, model_dir, data_file, recipe):
    run_dir = tmp_path / "run"
    config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, recipe), "max_steps=3"])
    train(config, progress=False)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(isinstance(v, float | int) and math.isfinite(v) for v in m.values()), m
        assert {"loss", "grad_norm", "lr", "tokens_per_s", "peak_memory_gb"} <= set(m)
    if recipe == "osft":
        assert metrics[0]["tau_s"] == pytest.approx(0.6) and 0 < metrics[0]["completions/mean_length"] <= 8
        assert 0 <= metrics[0]["completions/clipped_ratio"] <= 1
    assert (run_dir / "config.yaml").exists()
    # the checkpoint is a normal transformers model directory
    assert set(final_weights(run_dir)) >= {"model.embed_tokens.weight"}


def test_osft_loss_equals_the_reference_backend_on_a_batch(tmp_path, model_dir, data_file):
    losses = []
    for backend in ("torch", "reference"):
        config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path), f"model.backend={backend}",
                                    "osft.tau_t=0.9"])
        lm = load_causal_lm(config.model, torch.device("cpu"))
        recipe = make_recipe(config, lm)
        torch.manual_seed(0)
        batch, _ = recipe.make_batch(arithmetic_rows()[:4], epoch=0.0)
        loss = recipe.loss(batch, recipe.num_items(batch))
        grads = torch.autograd.grad(loss, [p for p in lm.model.parameters()])
        losses.append((loss, grads))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batching_does_not_change_the_gradient(tmp_path, model_dir, data_file):
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "sft")])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    recipe = make_recipe(config, lm)
    batch, _ = recipe.make_batch(arithmetic_rows()[:6], epoch=0.0)
    gradients = []
    for budget in (10_000, 40):
        parts = micro_batches(batch, budget)
        assert (len(parts) == 1) == (budget == 10_000)
        for micro in parts:
            recipe.loss(micro, recipe.num_items(batch)).backward()
        gradients.append([p.grad.clone() for p in lm.model.parameters()])
        lm.model.zero_grad()
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pack_puts_labels_on_responses_only():
    batch = pack([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 2, 1]]
    assert batch.labels.tolist() == [[-100, -100, -100, 9, 2], [-100, 10, 11, 2, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.num_targets == 5


# ---------------------------------------------------------------------------------------------
# resume

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
