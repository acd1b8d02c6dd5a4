"""osft.evaluate: the unbiased pass@k against enumeration, and evaluation before, during and after
training."""
import json
import subprocess
import sys

import pytest
from helpers.runs import base_overrides

from osft.config import load_config
from osft.train import train


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
        correct = line["per_prompt"]["correct"]
        assert len(correct) == 3 and line["eval/pass@1"] == pytest.approx(sum(correct) / 12)
        assert line["eval/pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 3)
        for k in (1, 2, 4):
            assert 0 <= line[f"eval/pass@{k}_low"] <= line[f"eval/pass@{k}"] <= line[f"eval/pass@{k}_high"] <= 1
    result = subprocess.run([sys.executable, "-m", "osft", "eval", "/dev/null",
                             *base_overrides(model_dir, data_file, tmp_path / "eval-only", "sft"),
                             f"eval.data={data_file}", "eval.max_prompts=2", "eval.samples=2"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0 and '"eval/pass@2"' in result.stdout, result.stderr[-2000:]


def test_greedy_evaluation_and_no_evaluation_at_start(tmp_path, model_dir, data_file):
    run_dir = tmp_path / "run"
    config = load_config(None, [*base_overrides(model_dir, data_file, run_dir, "sft"), "max_steps=2",
                                f"eval.data={data_file}", "eval.samples=2", "eval.max_prompts=3",
                                "eval.reward=exact_match", "eval.greedy=true", "eval.at_start=false"])
    train(config, progress=False)
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2]
    assert 0 <= lines[0]["eval/greedy_pass@1"] <= 1
