"""Configurations and outputs of the tiny training runs that the `osft` tests make."""
import json

from transformers import AutoModelForCausalLM


def base_overrides(model_dir, data_file, run_dir, recipe="osft"):
    return [f"recipe={recipe}", f"model.path={model_dir}", f"data.train={data_file}", f"run_dir={run_dir}",
            "prompts_per_step=4", "rollout.max_new_tokens=8", "optim.lr=1e-3", "optim.micro_batch_tokens=64"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    latest = max((run_dir / "checkpoints").glob("step-*"))
    return AutoModelForCausalLM.from_pretrained(latest).state_dict()
