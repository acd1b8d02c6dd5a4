"""Offline training data from a behavior policy: the model prompted with worked examples (few-shot)
samples solutions of the training prompts, and the logprob of every sampled token (EOS included)
under the distribution it was drawn from is recorded as it is generated. The rows pair the plain
prompt with the response and its ``behavior_logprobs``: what the ``sft`` and ``pear`` recipes read,
the same column ``osft score`` writes."""
from dataclasses import dataclass

from .config import Config
from .data import prompt_text, tokenize_prompts
from .model import CausalLM
from .rewards import REWARDS
from .rollout import RolloutEngine


def few_shot_prompt(prompt: str, examples: list[dict], tokenizer) -> list[dict] | str:
    """``prompt`` preceded by worked ``examples`` (rows with ``prompt`` and ``solution``): a chat of
    user/assistant turns, or, for a tokenizer without a chat template, the texts one after another."""
    if tokenizer.chat_template:
        turns = [m for e in examples for m in ({"role": "user", "content": e["prompt"]},
                                                  {"role": "assistant", "content": e["solution"]})]
        return turns + [{"role": "user", "content": prompt}]
    return "".join(f"{e['prompt']}\n{e['solution']}\n\n" for e in examples) + prompt


@dataclass
class BehaviorData:
    """``rows``: ``prompt``, ``answer``, ``response`` and ``behavior_logprobs`` (one per response token and
    EOS); the counts of the sampled completions, of those ``kept``, and why the others were left out."""

    rows: list[dict]
    sampled: int
    kept: int
    truncated: int
    wrong: int
    not_retokenized: int


def sample_behavior_data(lm: CausalLM, config: Config, engine: RolloutEngine, rows: list[dict],
                         examples: list[dict], *, samples: int, temperature: float,
                         keep: str = "correct") -> BehaviorData:
    """``samples`` completions of each of ``rows`` (``prompt``, ``answer``) at ``temperature`` from ``lm``
    prompted with ``examples``; kept: complete ones (EOS before ``rollout.max_new_tokens``) whose text
    tokenizes back to the sampled tokens (so the recipes see the tokens the logprobs belong to), and with
    ``keep="correct"`` only those the ``eval.reward`` judges right."""
    if keep not in ("correct", "complete"):
        raise ValueError(f"keep must be 'correct' or 'complete', got {keep!r}")
    if samples < 1 or not temperature > 0:
        raise ValueError(f"need samples >= 1 and temperature > 0, got {samples} and {temperature}")
    data, tokenizer = config.data, lm.tokenizer
    behavior_rows = [{data.prompt_column: few_shot_prompt(row[data.prompt_column], examples, tokenizer)}
                     for row in rows]
    completions = engine.generate(tokenize_prompts(behavior_rows, data, tokenizer), temperature=temperature,
                                  num_samples=samples)
    repeated = [row for row in rows for _ in range(samples)]
    texts = tokenizer.batch_decode([c.token_ids[:-1] for c in completions], skip_special_tokens=False)
    rewards = REWARDS[config.eval.reward]([prompt_text(r[data.prompt_column], tokenizer) for r in repeated], texts,
                                          answer=[r[data.answer_column] for r in repeated])
    kept, truncated, wrong, not_retokenized = [], 0, 0, 0
    for row, completion, text, reward in zip(repeated, completions, texts, rewards):
        if completion.truncated:
            truncated += 1
        elif keep == "correct" and reward != 1.0:
            wrong += 1
        elif tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] \
                != completion.token_ids:
            not_retokenized += 1
        else:
            kept.append({data.prompt_column: row[data.prompt_column], data.answer_column: row[data.answer_column],
                         data.response_column: text, data.behavior_logprobs_column: completion.logprobs})
    return BehaviorData(kept, len(completions), len(kept), truncated, wrong, not_retokenized)
