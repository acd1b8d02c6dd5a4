"""The recipes end to end on a tiny model: each runs and logs, the loss goes through the fused op
exactly, GRPO's scoring, importance sampling, advantages and clip metrics, and masked truncations."""
import math
import subprocess
import sys

import pytest
import torch
from helpers.runs import base_overrides, final_weights, read_metrics
from helpers.tiny_lm import arithmetic_rows, write_rows

from osft.config import load_config
from osft.data import micro_batches
from osft.model import load_causal_lm
from osft.recipes import make_recipe
from osft.train import train


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
        loss, _ = recipe.loss(batch, recipe.num_items(batch))
        grads = torch.autograd.grad(loss, [p for p in lm.model.parameters()])
        losses.append((loss, grads))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grpo_runs_with_every_option(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "grpo"
    config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, "grpo"), "max_steps=4",
                                "prompts_per_step=2", "grpo.num_generations=3", "grpo.reward=exact_match",
                                "grpo.num_iterations=2", "grpo.kl_coef=0.05", "grpo.dual_clip=3.0",
                                "grpo.clip_high=0.28", "grpo.is_cap=2.0", "grpo.entropy_coef=0.01",
                                "grpo.agg=seq-mean-token-mean", "save_every=1"])
    train(config, progress=False)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values()), m
        assert {"reward", "reward_std", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "completions/mean_length", "completions/clipped_ratio"} <= set(m)
    # two updates per generated batch: the second one sees ratios away from 1 and a nonzero KL
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[1]["kl"] > 0
    # checkpoints only between batches
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]


def test_grpo_scores_old_and_reference_logprobs_through_the_micro_batches(tmp_path, model_dir, data_file, monkeypatch):
    """The old and reference policies score a generated batch micro-batch by micro-batch
    (``optim.micro_batch_tokens``), never the whole batch in one decoder forward, and the scores equal
    the whole batch's."""
    from osft.model import CausalLM
    from osft.scoring import target_logprobs

    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.num_generations=3",
                                "grpo.num_iterations=2", "grpo.kl_coef=0.1", "optim.micro_batch_tokens=40"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    recipe = make_recipe(config, lm)
    forwards = []
    decoder = CausalLM.hidden_states

    def counted(self, input_ids, attention_mask):
        forwards.append(tuple(input_ids.shape))
        return decoder(self, input_ids, attention_mask)

    monkeypatch.setattr(CausalLM, "hidden_states", counted)
    torch.manual_seed(0)
    batch, _ = recipe.make_batch(arithmetic_rows()[:4], epoch=0.0)
    parts = micro_batches(batch, 40)
    assert len(parts) > 2 and len(forwards) == 2 * len(parts)  # old and reference policies, one pass each
    assert all(rows * width <= 40 or rows == 1 for rows, width in forwards)
    for name, model in (("old_logprobs", lm), ("ref_logprobs", recipe.reference)):
        whole = target_logprobs(model, batch, temperature=config.grpo.temperature)
        scored = batch.token_values[name]
        assert scored.shape == batch.target_mask.shape
        torch.testing.assert_close(scored, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_importance_sampling_on_policy_runs_the_decoder_once(tmp_path, model_dir, data_file, monkeypatch, level):
    """With ``is_cap`` set and one update per batch, the trainer's side of the importance weights comes
    from the fused pass itself: one decoder forward per micro-batch, and the loss of explicit weights
    from a separate scoring pass."""
    from osft.model import CausalLM
    from osft.scoring import target_logprobs
    from osft_kernels.losses import grpo_loss, truncated_importance_weights

    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.num_generations=2",
                                "grpo.is_cap=1.2", f"grpo.is_level={level}"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    recipe = make_recipe(config, lm)
    torch.manual_seed(0)
    batch, _ = recipe.make_batch(arithmetic_rows()[:2], epoch=0.0)
    shift = torch.tensor([-0.3, 0.3, -0.3, 0.3])[:, None]  # ratios above the cap on rows 0 and 2, below on 1 and 3
    batch.token_values["engine_logprobs"] += torch.where(batch.target_mask, shift, 0.0)
    forwards = []
    decoder = CausalLM.hidden_states
    monkeypatch.setattr(CausalLM, "hidden_states", lambda self, *args: forwards.append(1) or decoder(self, *args))
    loss, _ = recipe.loss(batch, recipe.num_items(batch))
    assert len(forwards) == 1
    monkeypatch.setattr(CausalLM, "hidden_states", decoder)
    mask = batch.target_mask
    trainer = target_logprobs(lm, batch, temperature=1.0)
    weights = truncated_importance_weights(trainer, batch.token_values["engine_logprobs"], mask, cap=1.2, level=level)
    assert (weights[mask] == 1.2).any() and (weights[mask] < 1.2).any()
    expected, _ = grpo_loss(lm.hidden_states(batch.input_ids, batch.attention_mask), lm.head().weight, batch.labels,
                            None, batch.row_values["advantages"], is_weights=weights, shift=True,
                            norm_length=float(config.rollout.max_new_tokens), num_items=recipe.num_items(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_grpo_advantages_and_clip_metrics_on_a_constructed_batch(tmp_path, model_dir, data_file):
    from osft.rollout import Completion

    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.num_generations=2",
                                "grpo.clip_low=0.1", "grpo.clip_high=0.1"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    recipe = make_recipe(config, lm)
    tokens = lm.tokenizer("3 plus 4 is 7", add_special_tokens=False)["input_ids"]
    recipe.engine.generate = lambda prompts, temperature, num_samples: [
        Completion(tokens[:k] + [lm.tokenizer.eos_token_id], [-1.0] * (k + 1), False) for k in (2, 3, 4, 5)]
    recipe.reward = lambda prompts, completions, answer: [1.0, 0.0, 1.0, 1.0]
    batch, metrics = recipe.make_batch(arithmetic_rows()[:2], epoch=0.0)
    # group (1, 0): mean 0.5, unbiased std 0.7071 -> +-0.7071; group (1, 1): 0
    torch.testing.assert_close(batch.row_values["advantages"], torch.tensor([0.70710, -0.70710, 0.0, 0.0]),
                               rtol=0, atol=1e-4)
    assert metrics["reward"] == 0.75 and metrics["completions/mean_length"] == 4.5

    # old logprobs that put ratios at e^0.3 (above 1 + 0.1) on row 0 and e^-0.3 on row 1
    from osft.scoring import target_logprobs
    current = target_logprobs(lm, batch, temperature=1.0)
    shift = torch.tensor([-0.3, 0.3, 0.0, 0.0])[:, None]
    batch.token_values["old_logprobs"] = current + shift
    loss, loss_metrics = recipe.loss(batch, recipe.num_items(batch))
    mask = batch.labels[:, 1:] != -100
    row0, row1 = int(mask[0].sum()), int(mask[1].sum())
    total = int(mask.sum())
    # row 0: A > 0 and r = e^0.3 > 1.1 -> clipped high; row 1: A < 0 and r = e^-0.3 < 0.9 -> clipped low
    assert loss_metrics["clip_ratio/high_mean"] == pytest.approx(row0 / total)
    assert loss_metrics["clip_ratio/low_mean"] == pytest.approx(row1 / total)
    # both rows are clipped, so the loss is the clipped objective: -A * (1 +- 0.1), token mean
    expected = (-0.70711 * 1.1 * row0 + 0.70711 * 0.9 * row1) / total
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "osft", "pear", "grpo"])
def test_every_recipe_runs_from_the_cli(tmp_path, model_dir, data_file, recipe):
    data = data_file
    if recipe == "pear":  # PEAR reads behavior logprobs, one per response word and EOS; constant ones are enough
        data = write_rows(tmp_path / "pear.jsonl", [{**r, "behavior_logprobs": [-1.0] * (len(r["response"].split()) + 1)}
                                                    for r in arithmetic_rows()])
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "osft", "train", "/dev/null", "--no-progress",
                             *base_overrides(model_dir, data, run_dir, recipe), "max_steps=2", "tensorboard=true",
                             "grpo.num_generations=2"], capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_metrics(run_dir)) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "grad_norm", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


@pytest.mark.parametrize("recipe_name", ["osft", "grpo"])
def test_truncated_completions_can_be_masked(tmp_path, model_dir, data_file, recipe_name):
    """With rollout.mask_truncated_completions, completions cut at max_new_tokens carry no labels (GRPO
    still counts them in their group's advantages); without it they are trained on."""
    from osft.rollout import Completion

    rows = arithmetic_rows()[:3]
    batches = {}
    for mask in (False, True):
        config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, recipe_name),
                                    "grpo.num_generations=2", f"rollout.mask_truncated_completions={str(mask).lower()}"])
        lm = load_causal_lm(config.model, torch.device("cpu"))
        recipe = make_recipe(config, lm)
        eos = lm.tokenizer.eos_token_id
        made = [Completion([5, 6, eos], [-1.0] * 3, truncated=False), Completion([7, 8, 9, 10], [-1.0] * 4, True),
                Completion([11, eos], [-1.0] * 2, truncated=False)]

        def generate(prompts, temperature, num_samples=1, made=made):
            return [made[i % len(made)] for i in range(len(prompts) * num_samples)]

        recipe.engine.generate = generate
        batch, _ = recipe.make_batch(rows, epoch=0.0)
        truncated = [made[i % len(made)].truncated for i in range(batch.labels.shape[0])]
        assert (batch.labels != -100).any(1).tolist() == [not (mask and t) for t in truncated]
        loss, _ = recipe.loss(batch, recipe.num_items(batch))
        assert torch.isfinite(loss)
        batches[mask] = batch
    torch.testing.assert_close(batches[True].input_ids, batches[False].input_ids)
    if recipe_name == "grpo":  # the masked completion still counts in its group's statistics
        torch.testing.assert_close(batches[True].row_values["advantages"], batches[False].row_values["advantages"])
