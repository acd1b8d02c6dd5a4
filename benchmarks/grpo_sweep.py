"""GRPO's training reward under the settings a practitioner tunes (learning rate, group size, sampling
temperature, response length cap), at the demo's scale: the packaged SmolLM2-135M-Instruct, the built-in
math task, OSFT's steps and prompts (6 steps of 8 prompts), no evaluation. A measurement, not a test::

    .venv/bin/python -m benchmarks.grpo_sweep               # every setting below, about 4 min each on 2 cores
    .venv/bin/python -m benchmarks.grpo_sweep lr=1e-4 g8    # some of them
    .venv/bin/python -m benchmarks.grpo_sweep lr=2e-5 --model DIR  # from another start, e.g. a checkpoint

Prints, per setting, the mean reward of each step's rollouts, the share cut at the length cap and the
mean response length. Run it alone: two jobs on a 2-core machine slow each other down several times.
"""
import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from osft.demo import DemoSettings, _quiet_libraries, recipe_config
from osft.packaged import resolve_model_path
from osft.tasks import write_task
from osft.train import train
from osft_kernels.device_info import describe

SETTINGS = {  # dotted config changes on top of the demo's GRPO run at OSFT's steps and prompts
    "lr=2e-5": {"optim.lr": 2e-5},
    "lr=5e-5": {"optim.lr": 5e-5},
    "lr=1e-4": {"optim.lr": 1e-4},
    "g8": {"optim.lr": 5e-5, "grpo.num_generations": 8},
    "T=0.7": {"optim.lr": 5e-5, "grpo.temperature": 0.7},
    "cap=160": {"optim.lr": 5e-5, "rollout.max_new_tokens": 160},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help=f"which of {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model's name or a model directory "
                        "(a checkpoint: the start of --pear's GRPO stage)")
    args = parser.parse_args()
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    _quiet_libraries()
    print(f"{describe(torch.device('cpu'))}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    demo = DemoSettings(model=args.model)
    steps = math.ceil(demo.train_prompts / demo.prompts_per_step)
    print(f"{args.model}: GRPO, {steps} steps of {demo.prompts_per_step} prompts x G rollouts "
          f"(demo defaults otherwise: G={demo.num_generations}, T={demo.grpo_temperature:g}, "
          f"cap {demo.max_new_tokens} tokens, truncated responses masked)")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        task = root / "task"
        write_task(task, seed=demo.seed, train_size=demo.train_prompts, eval_size=demo.eval_prompts,
                   difficulty=demo.difficulty)
        for name in args.settings or SETTINGS:
            config = recipe_config(demo, "grpo", resolve_model_path(args.model), task, run_dir=str(root / name),
                                   **{"eval.data": ""}, **SETTINGS[name])
            started = time.perf_counter()
            train(config, progress=False)
            metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            def row(key: str, digits: int) -> str:
                return " ".join(f"{m[key]:.{digits}f}" for m in metrics)

            print(f"{name} ({time.perf_counter() - started:.0f} s): reward {row('reward', 3)} | cut "
                  f"{row('completions/clipped_ratio', 2)} | length {row('completions/mean_length', 0)}", flush=True)


if __name__ == "__main__":
    main()
