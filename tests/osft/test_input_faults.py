"""Bad inputs are refused with the file, line or row, and column (data) or the path (model), and a
missing gold answer is never judged: each test here failed before its fix."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.tiny_lm import arithmetic_rows, write_rows
from transformers import AutoTokenizer

from osft.config import ConfigError, DataConfig, ModelConfig, load_config
from osft.data import load_rows, tokenize_prompts, tokenize_responses
from osft.model import load_causal_lm
from osft.recipes import make_recipe
from osft.rewards import exact_match_reward, math_reward


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_parquet(path, rows):
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def recipe_for(recipe, model_dir, data, tmp_path, *overrides):
    config = load_config(None, [f"recipe={recipe}", f"model.path={model_dir}", f"data.train={data}",
                                f"run_dir={tmp_path / 'run'}", "rollout.max_new_tokens=4", *overrides])
    return make_recipe(config, load_causal_lm(config.model, torch.device("cpu")))


# ---------------------------------------------------------------------------------------------
# 1. a missing gold answer

def test_rewards_leave_a_missing_gold_answer_unjudged():
    completions = ["the answer is none", "\\boxed{None}", "the answer is ."]
    assert exact_match_reward(["q"] * 3, completions, answer=[None, None, " "]) == [None, None, None]
    assert math_reward(["q"] * 3, completions, answer=[None, None, " "]) == [None, None, None]


def test_grpo_counts_a_missing_gold_answer_as_unjudged(tmp_path, model_dir):
    from osft.rollout import Completion

    data = write_rows(tmp_path / "train.jsonl", arithmetic_rows(2))
    recipe = recipe_for("grpo", model_dir, data, tmp_path, "grpo.num_generations=2", "grpo.reward=exact_match")
    recipe.engine.generate = lambda prompts, temperature, num_samples: [
        Completion([recipe.lm.tokenizer.eos_token_id], [-1.0], False) for _ in range(len(prompts) * num_samples)]
    rows = [{"prompt": "what is 1 plus 2 ?", "answer": None}, {"prompt": "what is 1 plus 3 ?", "answer": "4"}]
    _, metrics = recipe.make_batch(rows, epoch=0.0)
    assert metrics["rewards/unjudged_ratio"] == 0.5


def test_a_null_gold_answer_is_refused_when_loading(tmp_path):
    rows = arithmetic_rows(3)
    rows[2]["answer"] = None
    path = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path} line 3: column 'answer' is null"):
        load_rows(str(path), ["prompt", "answer"])


# ---------------------------------------------------------------------------------------------
# 2. data files

def test_empty_jsonl_is_refused(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=rf"data file {path} has no rows"):
        load_rows(str(path), ["prompt"])


def test_malformed_jsonl_names_the_line_and_column(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "", '{"prompt": "b"}', '{"prompt": "c",}'])
    with pytest.raises(ValueError, match=rf"{path} line 4 column 16: not valid JSON"):
        load_rows(str(path), ["prompt"])
    write_lines(path, ['{"prompt": "a"}', '["prompt", "b"]'])
    with pytest.raises(ValueError, match=rf"{path} line 2: expected a JSON object, got list"):
        load_rows(str(path), ["prompt"])


def test_malformed_parquet_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=rf"data file {path} is not a readable parquet file"):
        load_rows(str(path), ["prompt"])


@pytest.mark.parametrize("column", ["prompt", "response"])
def test_null_prompt_or_response_names_the_row_and_column(tmp_path, column):
    rows = arithmetic_rows(3)
    rows[1][column] = None
    path = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path} line 2: column '{column}' is null"):
        load_rows(str(path), ["prompt", "response"])
    parquet = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(ValueError, match=rf"{parquet} row index 1: column '{column}' is null"):
        load_rows(str(parquet), ["prompt", "response"])


def test_non_string_prompt_or_response_names_the_row_and_column(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in arithmetic_rows(2)] +
                       [json.dumps({"prompt": 5, "response": "5"}), json.dumps({"prompt": "5", "response": [5]})])
    rows = load_rows(str(path), ["prompt", "response"])
    with pytest.raises(ValueError, match=rf"{path} line 3: column 'prompt' must be text or chat messages"):
        tokenize_prompts(rows, DataConfig(), tokenizer)
    with pytest.raises(ValueError, match=rf"{path} line 4: column 'response' must be text, got \[5\]"):
        tokenize_responses(rows, DataConfig(), tokenizer)


def test_mis_sized_behavior_logprobs_name_the_row_and_column(tmp_path, model_dir):
    rows = [{**r, "behavior_logprobs": [-1.0] * (len(r["response"].split()) + 1)} for r in arithmetic_rows(3)]
    tokens = len(rows[1]["behavior_logprobs"])  # a word-level tokenizer: the words and EOS
    rows[1]["behavior_logprobs"] += [-1.0] * 20  # as another tokenization would give
    path = write_parquet(tmp_path / "scored.parquet", rows)
    recipe = recipe_for("pear", model_dir, path, tmp_path)
    with pytest.raises(ValueError, match=rf"{path} row index 1: behavior_logprobs has {tokens + 20} values for a "
                                         rf"response of {tokens} tokens \(EOS included\) with this tokenizer, "
                                         rf"expected {tokens}:"):
        recipe.make_batch(load_rows(str(path), ["prompt", "response", "behavior_logprobs"]), epoch=0.0)
    # values cut by a smaller max_response_tokens when scoring fit; fewer than are trained on do not
    rows[1]["behavior_logprobs"] = [-1.0] * 6
    path = write_rows(tmp_path / "scored.jsonl", rows)
    recipe.config.data.max_response_tokens = 6
    recipe.make_batch(load_rows(str(path), ["prompt", "response", "behavior_logprobs"]), epoch=0.0)
    recipe.config.data.max_response_tokens = 8
    with pytest.raises(ValueError, match=rf"{path} line 2: behavior_logprobs has 6 values .* expected 8 to {tokens}:"):
        recipe.make_batch(load_rows(str(path), ["prompt", "response", "behavior_logprobs"]), epoch=0.0)


# ---------------------------------------------------------------------------------------------
# 3. model directories

@pytest.mark.parametrize("name", ["missing-dir", "some/local-dir"])
def test_missing_model_dir_is_a_config_error_without_hub_text(tmp_path, name):
    path = str(tmp_path / name) if name == "missing-dir" else name
    with pytest.raises(ConfigError, match=rf"model.path '{path}' is neither a directory nor a packaged model") as error:
        load_causal_lm(ModelConfig(path=path), torch.device("cpu"))
    assert not any(text in str(error.value) for text in ("Repo id", "internet", "huggingface.co"))


def test_cli_reports_a_missing_model_dir_as_a_bad_config(tmp_path):
    data = write_rows(tmp_path / "train.jsonl", arithmetic_rows(4))
    result = subprocess.run([sys.executable, "-m", "osft", "train", "/dev/null", "--no-progress",
                             f"model.path={tmp_path / 'missing'}", f"data.train={data}", f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"osft: bad config: model.path '{tmp_path / 'missing'}' is neither a directory" in result.stderr
    assert "Traceback" not in result.stderr and "huggingface.co" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "eval"])
def test_cli_reports_bad_data_and_a_missing_model_dir_without_a_traceback(tmp_path, model_dir, command):
    """Every command turns data and config errors into ``osft: bad ...`` and exit code 2."""
    good = write_rows(tmp_path / "train.jsonl", arithmetic_rows(4))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    key = "data.train" if command == "train" else "eval.data"

    def osft(model, data):
        return subprocess.run([sys.executable, "-m", "osft", command, "/dev/null", f"model.path={model}",
                               f"data.train={good}", f"{key}={data}", f"run_dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, check=False, timeout=300)

    result = osft(model_dir, empty)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"osft: bad data: data file {empty} has no rows" in result.stderr
    missing = osft(tmp_path / "nope", good)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert f"osft: bad config: model.path '{tmp_path / 'nope'}' is neither a directory" in missing.stderr
    assert "Traceback" not in result.stderr + missing.stderr


def test_truncated_safetensors_names_the_file(tmp_path, model_dir):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match=rf"cannot read the weights in {weights} \(truncated or corrupt\?\)"):
        load_causal_lm(ModelConfig(path=str(copy)), torch.device("cpu"))


def test_model_dir_without_tokenizer_says_so(tmp_path, model_dir):
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, copy)
    with pytest.raises(ConfigError, match=rf"model.path '{copy}' has no loadable tokenizer \(no tokenizer files"):
        load_causal_lm(ModelConfig(path=str(copy)), torch.device("cpu"))
