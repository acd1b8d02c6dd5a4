"""Evaluation: sample ``n`` completions per held-out prompt at a stated temperature, judge them with
a reward, and report pass@k (the unbiased estimator of Chen et al. 2021) and avg@n, each pass@k with
its 95% interval over the prompts (:mod:`osft.intervals`), and every prompt's counts."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from .config import Config
from .data import load_rows, prompt_text, tokenize_prompts
from .distributed import Ranks
from .intervals import score_interval
from .model import CausalLM
from .rewards import REWARDS
from .rollout import RolloutEngine, make_engine


def pass_at_k(n: int, correct: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that k of the n samples include a correct one."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    return 1.0 if n - correct < k else 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def load_eval_rows(config: Config) -> list[dict]:
    rows = load_rows(config.eval.data, [config.data.prompt_column, config.data.answer_column])
    return rows[:config.eval.max_prompts] if config.eval.max_prompts else rows


@dataclass
class Evaluation:
    """``metrics``: the scalars (see :func:`evaluate`); ``per_prompt``: ``correct`` (correct completions of
    each prompt, of ``samples``) and, with ``eval.greedy``, ``greedy`` (1 where its greedy completion is)."""

    metrics: dict[str, float]
    per_prompt: dict[str, list[int]]


def prompt_scores(per_prompt: dict[str, list[int]], samples: int) -> dict[str, list[float]]:
    """Every prompt's ``eval/pass@k`` (k = 1, 2, 4, ... <= ``samples``) and ``eval/greedy_pass@1``."""
    scores = {f"eval/pass@{k}": [pass_at_k(samples, correct, k) for correct in per_prompt["correct"]]
              for k in (2 ** j for j in range(int(math.log2(samples)) + 1))}
    if "greedy" in per_prompt:
        scores["eval/greedy_pass@1"] = [float(correct) for correct in per_prompt["greedy"]]
    return scores


@torch.no_grad()
def evaluate(lm: CausalLM, config: Config, rows: list[dict], engine: RolloutEngine | None = None,
             progress: Progress | None = None, ranks: Ranks = Ranks()) -> Evaluation:
    """``eval/pass@k`` for k = 1, 2, 4, ... <= n, each with ``eval/pass@k_low`` and ``_high`` (95%),
    ``eval/avg@n`` (mean reward over all samples), ``eval/mean_length`` and ``eval/unjudged_ratio``
    (completions the reward could not judge, counted wrong); with ``eval.greedy`` also
    ``eval/greedy_pass@1`` (and its interval). Generates with ``engine`` (default: a new ``rollout.engine``
    engine of ``lm``); ``progress``: a rich Progress to show generation on. With several ``ranks``, each
    judges its share of the prompts and every rank returns the merged evaluation."""
    settings, data, tokenizer = config.eval, config.data, lm.tokenizer
    n = settings.samples
    engine = engine if engine is not None else make_engine(lm, config)
    mine = ranks.share(rows)
    prompts = tokenize_prompts(mine, data, tokenizer)
    # the n samples of each prompt, then (with eval.greedy) its greedy completion, in one generation
    greedy_prompts = prompts if settings.greedy else []
    samples = len(prompts) * n
    completions = engine.generate([p for p in prompts for _ in range(n)] + greedy_prompts, progress=progress,
                                  temperature=[settings.temperature] * samples + [0.0] * len(greedy_prompts))
    sampled, greedy = completions[:samples], completions[samples:]
    rewards = ranks.concatenated(_judge(lm, config, mine, sampled, n))
    lengths = ranks.concatenated([len(c.token_ids) for c in sampled])
    per_prompt = {"correct": [sum(r == 1.0 for r in per_row) for per_row in rewards]}
    if settings.greedy:
        per_prompt["greedy"] = [int(per_row[0] == 1.0)
                                for per_row in ranks.concatenated(_judge(lm, config, mine, greedy, 1))]
    metrics = {}
    for name, scores in prompt_scores(per_prompt, n).items():
        estimate = score_interval(scores, 1 if name == "eval/greedy_pass@1" else n)
        metrics.update({name: estimate.mean, f"{name}_low": estimate.low, f"{name}_high": estimate.high})
    flat = [r for per_row in rewards for r in per_row]
    metrics[f"eval/avg@{n}"] = sum(r or 0.0 for r in flat) / len(flat)
    metrics["eval/mean_length"] = sum(lengths) / len(lengths)
    metrics["eval/unjudged_ratio"] = sum(r is None for r in flat) / len(flat)
    metrics["eval/temperature"] = settings.temperature
    return Evaluation(metrics, per_prompt)


def _judge(lm: CausalLM, config: Config, rows: list[dict], completions, n: int) -> list[list[float | None]]:
    """The rewards of ``n`` completions per row (prompt-major), one list per row."""
    data, tokenizer = config.data, lm.tokenizer
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    repeated = [row for row in rows for _ in range(n)]
    rewards = REWARDS[config.eval.reward]([prompt_text(r[data.prompt_column], tokenizer) for r in repeated], texts,
                                          answer=[r[data.answer_column] for r in repeated])
    return [rewards[i * n:(i + 1) * n] for i in range(len(rows))]


def append_eval(path: Path, step: int, evaluation: Evaluation) -> None:
    """One line of ``eval.jsonl``: the step, the metrics and ``per_prompt``."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **evaluation.metrics, "per_prompt": evaluation.per_prompt}) + "\n")
