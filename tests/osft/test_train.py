"""osft.train's step: micro-batching does not change the gradient, one read-back per step, and the
rollout-token budget."""
from pathlib import Path

import torch
from helpers.read_backs import record_read_backs
from helpers.runs import base_overrides, read_metrics
from helpers.tiny_lm import arithmetic_rows

from osft.config import load_config
from osft.data import micro_batches
from osft.model import load_causal_lm
from osft.recipes import make_recipe
from osft.train import train


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
            recipe.loss(micro, recipe.num_items(batch))[0].backward()
        gradients.append([p.grad.clone() for p in lm.model.parameters()])
        lm.model.zero_grad()
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_training_step_reads_values_back_once_whatever_the_micro_batches(tmp_path, model_dir, data_file,
                                                                            monkeypatch):
    """The loop keeps each micro-batch's loss and metrics on the device: the reads back to Python
    (``item``, ``tolist``, ``bool``) made by the training loop and the recipes do not grow with the number of
    micro-batches of a step."""
    import osft

    package = Path(osft.__file__).parent
    reads = record_read_backs(monkeypatch, str(package / "train.py"), str(package / "recipes"))
    counts = {}
    for budget in (10_000, 40):
        reads.clear()
        run_dir = tmp_path / str(budget)
        config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, "grpo"), "max_steps=1",
                                    "grpo.num_generations=2", "grpo.is_cap=2.0", f"optim.micro_batch_tokens={budget}"])
        train(config, progress=False)
        counts[budget] = len(reads)
        assert len(read_metrics(run_dir)) == 1
    assert counts[10_000] == counts[40] > 0


def test_rollout_token_budget_stops_the_run_and_survives_resume(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    overrides = [*base_overrides(model_dir, data_file, run_dir), "max_steps=50", "max_rollout_tokens=20", "save_every=1"]
    train(load_config(None, overrides), progress=False)
    metrics = read_metrics(run_dir)
    generated = [m["completions/num_tokens"] for m in metrics]
    # it stops after the first batch that brings the count to the budget, and counts every generated token
    assert sum(generated[:-1]) < 20 <= sum(generated) == metrics[-1]["rollout_tokens"]
    assert [m["rollout_tokens"] for m in metrics] == [sum(generated[:i + 1]) for i in range(len(generated))]
    assert all(0 < n <= 4 * 8 for n in generated)  # 4 prompts of at most 8 new tokens
    # a restart finds the budget spent in the checkpoint and trains no further
    train(load_config(None, [*overrides, "resume=auto"]), progress=False)
    assert read_metrics(run_dir) == metrics
