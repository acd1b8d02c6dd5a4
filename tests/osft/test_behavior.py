"""osft.behavior: the logprobs recorded while the behavior policy samples equal a teacher-forced
rescoring of the same tokens under the same (few-shot) prompt, the rows feed the sft and pear
recipes, and what is left out is counted."""
import json

import pytest
import torch
from helpers.runs import base_overrides

from osft.behavior import few_shot_prompt, sample_behavior_data
from osft.config import load_config
from osft.data import pack, tokenize_prompts, tokenize_responses_with_values
from osft.model import load_causal_lm
from osft.rollout import make_engine
from osft.scoring import target_logprobs
from osft.tasks import generate_task
from osft.train import train

EXAMPLES = [{"prompt": "what is 1 plus 2 ?", "solution": "1 plus 2 is 3 . the answer is 3"}]


def _rescored(lm, config, rows: list[dict], temperature: float) -> tuple[list[list[float]], list[list[float]]]:
    """Teacher-forced logprobs at ``temperature`` (float32, no autocast) of each row's response and EOS after
    its few-shot prompt, and the recorded ones, both as the recipes tokenize them."""
    data = config.data
    behavior_rows = [{**row, data.prompt_column: few_shot_prompt(row[data.prompt_column], EXAMPLES, lm.tokenizer)}
                     for row in rows]
    responses, recorded = tokenize_responses_with_values(behavior_rows, data.behavior_logprobs_column, data,
                                                         lm.tokenizer)
    batch = pack(tokenize_prompts(behavior_rows, data, lm.tokenizer), responses, lm.tokenizer.pad_token_id)
    logprobs = target_logprobs(lm, batch, temperature=temperature)
    return [values[mask].tolist() for values, mask in zip(logprobs, batch.target_mask)], recorded


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_equal_a_teacher_forced_rescoring(tmp_path, model_dir, data_file, temperature):
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "pear"), "rollout.max_new_tokens=8",
                                "rollout.autocast=off", "eval.reward=exact_match"])
    torch.manual_seed(0)
    lm = load_causal_lm(config.model, torch.device("cpu"))
    rows = [{"prompt": f"what is {a} plus 4 ?", "answer": str(a + 4)} for a in range(2, 8)]
    data = sample_behavior_data(lm, config, make_engine(lm, config), rows, EXAMPLES, samples=8,
                                temperature=temperature, keep="complete")
    assert data.sampled == 48 and data.kept == len(data.rows) >= 5
    assert data.kept + data.truncated + data.not_retokenized == 48 and data.wrong == 0
    assert {row["prompt"] for row in data.rows} <= {row["prompt"] for row in rows}  # without the examples
    rescored, recorded = _rescored(lm, config, data.rows, temperature)
    for values, from_generation in zip(rescored, recorded, strict=True):
        assert values == pytest.approx(from_generation, abs=1e-4)  # the temperature-scaled distribution


def test_keep_correct_drops_wrong_answers_and_rows_train_pear(tmp_path, model_dir, data_file):
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path / "run", "pear"),
                                "rollout.max_new_tokens=8", "eval.reward=exact_match", "max_steps=1"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    rows = [{"prompt": f"what is {a} plus 4 ?", "answer": str(a + 4)} for a in range(2, 8)]
    torch.manual_seed(1)
    complete = sample_behavior_data(lm, config, make_engine(lm, config), rows, EXAMPLES, samples=8, temperature=1.0,
                                    keep="complete")
    torch.manual_seed(1)
    correct = sample_behavior_data(lm, config, make_engine(lm, config), rows, EXAMPLES, samples=8, temperature=1.0)
    # the same samples, judged: exact_match on the untrained model's text is never right
    assert correct.kept == 0 and correct.wrong == complete.kept and correct.truncated == complete.truncated
    path = tmp_path / "behavior.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in complete.rows))
    train(load_config(None, [*base_overrides(model_dir, path, tmp_path / "run", "pear"), "max_steps=1"]),
          progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_few_shot_prompt_and_the_task_solutions():
    train, _ = generate_task(0, train_size=6, eval_size=0, difficulty=2)
    messages = few_shot_prompt("Compute 1 + 1.", train[:2], type("T", (), {"chat_template": "x"})())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == train[0]["solution"] and messages[-1]["content"] == "Compute 1 + 1."
    text = few_shot_prompt("Compute 1 + 1.", train[:1], type("T", (), {"chat_template": None})())
    assert text == f"{train[0]['prompt']}\n{train[0]['solution']}\n\nCompute 1 + 1."
    with pytest.raises(ValueError, match="keep must be 'correct' or 'complete'"):
        sample_behavior_data(None, None, None, [], [], samples=1, temperature=1.0, keep="all")
