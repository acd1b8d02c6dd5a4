"""Evaluation: sample ``n`` completions per held-out prompt at a stated temperature, judge them with
a reward, and report pass@k (the unbiased estimator of Chen et al. 2021) and avg@n."""
import json
import math
from pathlib import Path

import torch

from .config import Config
from .data import load_rows, prompt_text, tokenize_prompts
from .model import CausalLM
from .rewards import REWARDS
from .rollout import HFGenerateEngine, completion_metrics


def pass_at_k(n: int, correct: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that k of the n samples include a correct one."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    return 1.0 if n - correct < k else 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def load_eval_rows(config: Config) -> list[dict]:
    rows = load_rows(config.eval.data, [config.data.prompt_column, config.data.answer_column])
    return rows[:config.eval.max_prompts] if config.eval.max_prompts else rows


@torch.no_grad()
def evaluate(lm: CausalLM, config: Config, rows: list[dict]) -> dict[str, float]:
    """``eval/pass@k`` for k = 1, 2, 4, ... <= n, ``eval/avg@n`` (mean reward over all samples),
    ``eval/mean_length`` and ``eval/unjudged_ratio`` (completions the reward could not judge, counted wrong)."""
    settings, data, tokenizer = config.eval, config.data, lm.tokenizer
    n = settings.samples
    completions = HFGenerateEngine(lm, config.rollout).generate(tokenize_prompts(rows, data, tokenizer),
                                                                temperature=settings.temperature, num_samples=n)
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    repeated = [row for row in rows for _ in range(n)]
    rewards = REWARDS[settings.reward]([prompt_text(r[data.prompt_column], tokenizer) for r in repeated], texts,
                                       answer=[r[data.answer_column] for r in repeated])
    correct = [sum(1 for r in rewards[i * n:(i + 1) * n] if r == 1.0) for i in range(len(rows))]
    metrics = {f"eval/pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(rows)
               for k in (2 ** j for j in range(int(math.log2(n)) + 1))}
    metrics[f"eval/avg@{n}"] = sum(r or 0.0 for r in rewards) / len(rewards)
    metrics["eval/mean_length"] = completion_metrics(completions)["completions/mean_length"]
    metrics["eval/unjudged_ratio"] = sum(r is None for r in rewards) / len(rewards)
    metrics["eval/temperature"] = settings.temperature
    return metrics


def append_eval(path: Path, step: int, metrics: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
