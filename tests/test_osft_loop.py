"""The `osft` training loop on a tiny model built from a config: configuration errors, the sft and
osft recipes end to end, the loss going through the fused op exactly, micro-batching, and resuming a
killed run."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from read_backs import record_read_backs
from tiny_lm import arithmetic_rows, write_rows
from torch import nn
from transformers import AutoModelForCausalLM

from osft.config import ConfigError, load_config
from osft.data import micro_batches, pack
from osft.model import load_causal_lm, output_head
from osft.recipes import make_recipe
from osft.train import train

ROOT = Path(__file__).resolve().parent.parent


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
    ("recipe=dpo", r"recipe must be one of \['sft', 'osft', 'pear', 'grpo'\]"),
    ("grpo.dual_clip=0.5", r"grpo.dual_clip must be null \(off\) or > 1"),
    ("grpo.dual_clip=0", r"grpo.dual_clip must be null \(off\) or > 1"),
    ("grpo.is_cap=0", "grpo.is_cap must be > 0"),
    ("grpo.agg=mean", "grpo.agg must be one of"),
    ("max_steps=-1", "max_steps must be >= 0"),
    ("seed=-1", r"seed must be in \[0, 2\*\*32\)"),
    ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\]"),
    ("eval.temperature=0", "eval.temperature must be > 0"),
    ("grpo.is_cap=-2", "grpo.is_cap must be > 0"),
    ("model.gradient_checkpointing=yes please", "model.gradient_checkpointing must be true or false"),
    ("osft.tau_s_start=1.5", "OSFT needs tau_s <= tau_t"),
    ("optim=3", "optim must be a mapping"),
])
def test_bad_config_is_refused_with_the_key(tmp_path, model_dir, data_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), override])


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_fused_inputs_carry_the_models_logit_transform(family):
    """Every recipe and the scoring reach the fused ops through ``CausalLM.fused_inputs``: its logprobs
    equal the model's own logits (Granite's logits_scaling, Cohere's logit_scale, Gemma 2's final softcap)
    at a temperature, in float64."""
    import transformers

    from osft.data import pack
    from osft.model import CausalLM
    from osft_kernels import linear_logprobs

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model_class, config_class, transform = {
        "granite": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0}),
        "cohere": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 0.25}),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"final_logit_softcapping": 3.0})}[family]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**transform, **common))
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], pad_id=0)
    lm = CausalLM(model.eval(), tokenizer=None, backend="torch")
    ours = linear_logprobs(**lm.fused_inputs(batch, temperature=0.7)).logprobs
    with torch.no_grad():
        logits = model.double()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    expected = (logits / 0.7).log_softmax(-1).gather(-1, batch.labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = batch.target_mask
    torch.testing.assert_close(ours[mask].double(), expected[mask], rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_is_refused_for_the_vllm_engine(tmp_path, model_dir, data_file):
    with pytest.raises(ConfigError, match="rollout.autocast applies to the hf engine"):
        load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm",
                           "rollout.autocast=bfloat16"])
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm"])
    assert config.rollout.autocast == "auto"


def test_config_values_and_overrides(tmp_path, model_dir, data_file):
    (tmp_path / "c.yaml").write_text("recipe: sft\noptim:\n  lr: 2.0e-5\n  schedule: cosine\n")
    config = load_config(tmp_path / "c.yaml", [*base_overrides(model_dir, data_file, tmp_path, "sft")[1:],
                                                "optim.lr=1e-5", "model.gradient_checkpointing=true"])
    assert config.recipe == "sft" and config.optim.lr == 1e-5 and config.optim.schedule == "cosine"
    assert config.model.gradient_checkpointing is True and config.prompts_per_step == 4
    off = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.is_cap=null",
                             "grpo.dual_clip=null"])
    on = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "grpo"), "grpo.is_cap=2",
                            "grpo.dual_clip=3"])
    assert (off.grpo.is_cap, off.grpo.dual_clip) == (None, None) and (on.grpo.is_cap, on.grpo.dual_clip) == (2.0, 3.0)


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
        loss, _ = recipe.loss(batch, recipe.num_items(batch))
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
            recipe.loss(micro, recipe.num_items(batch))[0].backward()
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


def test_pack_puts_response_values_in_target_coordinates():
    """Per-token values sit where the fused ops' outputs and ``target_mask`` put each target: entry t
    belongs to ``labels[:, t + 1]``; with an empty prompt the first response token is no target."""
    batch = pack([[5, 6, 7], [], [8]], [[9, 2], [10, 11, 2], [3]], pad_id=1,
                 response_values={"lp": [[-0.5, -0.25], [-1.0, -2.0, -3.0], [-4.0]]})
    values = batch.token_values["lp"]
    assert values.shape == batch.target_mask.shape == (3, 4)
    assert values.tolist() == [[0, 0, -0.5, -0.25], [-2.0, -3.0, 0, 0], [-4.0, 0, 0, 0]]
    assert torch.equal(values != 0, batch.target_mask)
    assert batch.truncate(3).token_values["lp"].tolist() == [[0, 0], [-2.0, -3.0], [-4.0, 0]]


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


# ---------------------------------------------------------------------------------------------
# GRPO

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


@pytest.mark.parametrize("completion,gold,expected", [
    ("12 plus 7 is 19, so the answer is \\boxed{19}.", "19", 1.0),
    ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("<answer>19</answer>", "19", 1.0),
    ("\\boxed{20}", "19", 0.0),
    ("I do not know", "19", 0.0),
    ("\\boxed{19}", "\\frac{", None),
])
def test_math_reward_on_hand_labelled_completions(completion, gold, expected):
    from osft.rewards import math_reward
    assert math_reward(["q"], [completion], answer=[gold]) == [expected]


def test_exact_match_reward():
    from osft.rewards import exact_match_reward
    completions = ["so the answer is 7.", "\\boxed{ Paris }", "<answer>8</answer>", "it is 7"]
    assert exact_match_reward([""] * 4, completions, answer=["7", "paris", "7", "7"]) == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# osft score and PEAR

def test_score_round_trips_through_parquet_and_feeds_pear(tmp_path, model_dir, data_file):
    import datasets

    from osft.data import pack, tokenize_prompts, tokenize_responses
    from osft.scoring import target_logprobs

    output = tmp_path / "scored.parquet"
    result = subprocess.run([sys.executable, "-m", "osft", "score", "/dev/null", "--output", str(output),
                             *base_overrides(model_dir, data_file, tmp_path, "sft")], capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = datasets.load_dataset("parquet", data_files=str(output), split="train").to_list()
    rows = arithmetic_rows()
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in rows]
    config = load_config(None, base_overrides(model_dir, data_file, tmp_path, "sft"))
    lm = load_causal_lm(config.model, torch.device("cpu"))
    batch = pack(tokenize_prompts(rows[:3], config.data, lm.tokenizer),
                 tokenize_responses(rows[:3], config.data, lm.tokenizer), lm.tokenizer.pad_token_id)
    direct = target_logprobs(lm, batch, temperature=1.0)
    for i in range(3):
        expected = direct[i][batch.labels[i, 1:] != -100]
        assert len(scored[i]["behavior_logprobs"]) == len(expected)
        torch.testing.assert_close(torch.tensor(scored[i]["behavior_logprobs"]), expected, rtol=1e-5, atol=1e-6)

    # PEAR trains on the scored file; at step 1 the current policy is the behavior policy, so every
    # clipped log-ratio is 0 and the token-level weights are gamma^(T - t)
    run_dir = tmp_path / "pear"
    pear = load_config(None, [*base_overrides(model_dir, output, run_dir, "pear"), "max_steps=2", "pear.level=block",
                              "pear.block_size=2"])
    train(pear, progress=False)
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run_dir))


def test_pear_refuses_behavior_logprobs_of_another_tokenization(tmp_path, model_dir):
    rows = [{**r, "behavior_logprobs": [-1.0]} for r in arithmetic_rows(4)]
    data = write_rows(tmp_path / "short.jsonl", rows)
    config = load_config(None, [*base_overrides(model_dir, data, tmp_path / "run", "pear"), "max_steps=1"])
    with pytest.raises(ValueError, match="behavior_logprobs has 1 values for a response of"):
        train(config, progress=False)


# ---------------------------------------------------------------------------------------------
# evaluation

def pass_at_k_by_enumeration(n, correct, k):
    """The share of the k-subsets of n samples (correct ones first) that contain a correct sample."""
    from itertools import combinations
    subsets = list(combinations(range(n), k))
    return sum(any(i < correct for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,correct,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (4, 3, 2), (8, 2, 4), (8, 8, 8), (5, 1, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, correct, k):
    from osft.evaluate import pass_at_k
    assert pass_at_k(n, correct, k) == pytest.approx(pass_at_k_by_enumeration(n, correct, k))


def test_evaluation_before_during_and_after_training(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, "sft"), "max_steps=4",
                                f"eval.data={data_file}", "eval.every=2", "eval.samples=4", "eval.max_prompts=3",
                                "eval.reward=exact_match", "eval.temperature=0.7"])
    train(config, progress=False)
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    for line in lines:
        assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/avg@4", "eval/mean_length"} <= set(line)
        assert 0 <= line["eval/pass@1"] <= line["eval/pass@2"] <= line["eval/pass@4"] <= 1
        assert line["eval/pass@1"] == pytest.approx(line["eval/avg@4"])  # no unjudged completions here
    result = subprocess.run([sys.executable, "-m", "osft", "eval", "/dev/null",
                             *base_overrides(model_dir, data_file, tmp_path / "eval-only", "sft"),
                             f"eval.data={data_file}", "eval.max_prompts=2", "eval.samples=2"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0 and '"eval/pass@2"' in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["osft", "grpo", "sft", "pear"])
def test_example_configs_are_valid(name):
    config = load_config(ROOT / "examples" / f"{name}.yaml", ["model.path=/models/m", "data.train=/data/d.jsonl"])
    assert config.recipe == name


def test_vllm_engine_absence_is_reported(tmp_path, model_dir, data_file, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"rollout.engine=vllm needs vLLM: pip install '.\[vllm\]'"):
        make_recipe(config, lm)


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


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, model_dir, data_file):
    gradients = []
    for checkpointing in ("false", "true"):
        config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "sft"),
                                    f"model.gradient_checkpointing={checkpointing}"])
        lm = load_causal_lm(config.model, torch.device("cpu"))
        lm.model.train()
        recipe = make_recipe(config, lm)
        batch, _ = recipe.make_batch(arithmetic_rows()[:4], epoch=0.0)
        loss, _ = recipe.loss(batch, recipe.num_items(batch))
        loss.backward()
        gradients.append({name: p.grad.clone() for name, p in lm.model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == len(list(lm.model.parameters()))
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-5, atol=1e-7)


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


def test_greedy_evaluation_and_no_evaluation_at_start(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, "sft"), "max_steps=2",
                                f"eval.data={data_file}", "eval.samples=2", "eval.max_prompts=3",
                                "eval.reward=exact_match", "eval.greedy=true", "eval.at_start=false"])
    train(config, progress=False)
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2]
    assert 0 <= lines[0]["eval/greedy_pass@1"] <= 1


def test_greedy_generation_is_the_argmax_path(model_dir):
    from osft.config import Config, ModelConfig, RolloutConfig
    from osft.rollout import HFGenerateEngine

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6]]
    engine = HFGenerateEngine(lm, Config(rollout=RolloutConfig(max_new_tokens=6, batch_size=2, autocast="off")))
    torch.manual_seed(1)
    first = engine.generate(prompts, temperature=0.0)
    torch.manual_seed(2)
    assert [c.token_ids for c in engine.generate(prompts, temperature=0.0)] == [c.token_ids for c in first]
    for prompt, completion in zip(prompts, first):  # each token is the argmax given the prefix
        ids = list(prompt)
        for token, logprob in zip(completion.token_ids, completion.logprobs):
            with torch.no_grad():
                logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
            assert token == int(logits.argmax())
            assert logprob == pytest.approx(float(logits.log_softmax(-1)[token]), abs=1e-4)
            ids.append(token)


def test_bfloat16_generation_records_the_logprobs_it_sampled_from(model_dir):
    """Under rollout.autocast=bfloat16 the float32 model samples through bfloat16 products, and each
    recorded logprob is that of the bfloat16 distribution (a teacher-forced pass under the same autocast
    gives it back), not the float32 one; ``auto`` picks it only for float32 weights on hardware that
    multiplies bfloat16 natively."""
    from osft.config import Config, ModelConfig, RolloutConfig
    from osft.model import native_bfloat16
    from osft.rollout import HFGenerateEngine, generation_autocast

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    assert generation_autocast(lm.model, "off") is None
    assert generation_autocast(lm.model, "auto") == (torch.bfloat16 if native_bfloat16(lm.device) else None)
    assert generation_autocast(copy.deepcopy(lm.model).bfloat16(), "bfloat16") is None  # already bfloat16
    with torch.no_grad():  # a sharper distribution than the tiny model's, so that bfloat16 shows
        lm.model.lm_head.weight.mul_(6.0)
    engine = HFGenerateEngine(lm, Config(rollout=RolloutConfig(max_new_tokens=8, batch_size=3, autocast="bfloat16")))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6], [7, 8, 9, 10]]
    torch.manual_seed(0)
    completions = engine.generate(prompts, temperature=1.0)
    gaps_to_float32 = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([list(prompt) + completion.token_ids])
        targets = ids[0, len(prompt):]
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = lm.model(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            full = lm.model(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        recorded = torch.tensor(completion.logprobs, dtype=torch.float64)
        torch.testing.assert_close(recorded, half.gather(1, targets[:, None])[:, 0].double(), rtol=0, atol=1e-3)
        gaps_to_float32.append((recorded - full.gather(1, targets[:, None])[:, 0]).abs().max())
    assert max(gaps_to_float32) > 2e-3  # bfloat16 products did run (the float32 logprobs are further off)


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
