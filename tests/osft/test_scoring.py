"""osft score: behavior logprobs written to parquet equal a teacher-forced rescoring, and feed PEAR."""
import math
import subprocess
import sys

import pytest
import torch
from helpers.runs import base_overrides, read_metrics
from helpers.tiny_lm import arithmetic_rows, write_rows

from osft.config import load_config
from osft.data import pack
from osft.model import load_causal_lm
from osft.train import train


def test_score_round_trips_through_parquet_and_feeds_pear(tmp_path, model_dir, data_file):
    import datasets

    from osft.data import tokenize_prompts, tokenize_responses
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
    metrics = read_metrics(run_dir)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    longest = max(len(r["behavior_logprobs"]) for r in scored)
    assert pear.pear.gamma ** longest <= metrics[0]["pear/weight_mean"] < 1.0


def test_pear_refuses_behavior_logprobs_of_another_tokenization(tmp_path, model_dir):
    rows = [{**r, "behavior_logprobs": [-1.0]} for r in arithmetic_rows(4)]
    data = write_rows(tmp_path / "short.jsonl", rows)
    config = load_config(None, [*base_overrides(model_dir, data, tmp_path / "run", "pear"), "max_steps=1"])
    with pytest.raises(ValueError, match="behavior_logprobs has 1 values for a response of"):
        train(config, progress=False)
