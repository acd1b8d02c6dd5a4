"""``osft demo``: OSFT against GRPO from the same pretrained model on the built-in math task.

1. Write the task (:mod:`osft.tasks`) into ``run_dir/task`` and evaluate the base model on the
   held-out prompts: pass@1 and pass@k at temperature 1 (``eval_samples`` per prompt, unbiased
   estimator), greedy pass@1, and the mean response length.
2. OSFT: one rollout per prompt at ``tau_s``, trained at ``tau_t = 1``, no reward.
3. GRPO: ``num_generations`` rollouts per prompt, math reward, group-normalized advantages, from the
   same base model, stopped once it has generated as many tokens as OSFT did (the same rollout
   budget; each step uses as many rollouts as an OSFT step).
4. Optionally the coupled ablation, OSFT with ``tau_s = tau_t = 1``, whose expected gradient is zero.

Every recipe is evaluated every ``eval_every`` steps and at its end. Writes ``results.json``,
``accuracy.png`` and ``table.md`` into ``run_dir`` and prints the table. Seeds are fixed, so the same
settings give the same table.
"""
import argparse
import json
import math
import platform
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from osft_kernels import backend_name

from .config import Config, RolloutConfig, config_from_dict
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import default_device, load_causal_lm
from .packaged import resolve_model_path
from .rollout import generation_autocast
from .tasks import MAX_DIFFICULTY, write_task
from .train import seed_everything, train

_HELP = {
    "model": "a packaged model (smollm2-135m, gemma3-270m) or a local transformers directory",
    "run_dir": "where the task, each recipe's run, results.json, table.md and accuracy.png go",
    "seed": "seeds the task, the sampling and the training",
    "difficulty": "the task's difficulty: 1 + N operations, larger operands every 2 levels",
    "train_prompts": "OSFT's training prompts (one rollout each); GRPO gets the same generated-token budget",
    "eval_prompts": "held-out prompts",
    "eval_samples": "completions per held-out prompt at temperature 1 (pass@1 .. pass@N)",
    "prompts_per_step": "OSFT prompts per optimizer step (GRPO: this / num_generations prompts)",
    "num_generations": "GRPO rollouts per prompt",
    "tau_s": "OSFT's sampling temperature (training temperature tau_t = 1)",
    "lr": "AdamW learning rate of both recipes",
    "max_new_tokens": "response length limit (longer responses are cut and get no loss)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "ablation": "also run OSFT with tau_s = tau_t = 1",
    "backend": "the fused loss's backend: auto, torch, triton, reference",
    "autocast": "generation (rollouts and evaluation) under bfloat16 autocast: bfloat16, off, or auto (where "
                "the hardware multiplies bfloat16 natively: AVX512-BF16 or AMX CPUs, CUDA GPUs)",
}


@dataclass
class DemoSettings:
    """The demo's knobs (see ``_HELP``); the defaults take 7-10 minutes on 2 CPU cores (bfloat16 or
    float32 generation)."""

    model: str = "smollm2-135m"
    run_dir: str = "runs/demo"
    seed: int = 0
    difficulty: int = 0
    train_prompts: int = 48
    eval_prompts: int = 24
    eval_samples: int = 4
    prompts_per_step: int = 8
    num_generations: int = 4
    tau_s: float = 0.6
    lr: float = 2e-5
    max_new_tokens: int = 96
    eval_every: int = 3
    ablation: bool = False
    backend: str = "auto"
    autocast: str = "auto"

    def __post_init__(self):
        for name in ("train_prompts", "eval_prompts", "eval_samples", "prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if not 0 <= self.difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"--difficulty must be in [0, {MAX_DIFFICULTY}], got {self.difficulty}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32) (what the RNG seeding functions accept), got {self.seed}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (GRPO compares rollouts within a group), "
                             f"got {self.num_generations}")
        if not 0 < self.tau_s <= 1:
            raise ValueError(f"--tau-s must be in (0, 1] (OSFT samples at or below tau_t = 1), got {self.tau_s}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.autocast not in typing.get_args(typing.get_type_hints(RolloutConfig)["autocast"]):
            raise ValueError(f"--autocast must be auto, bfloat16 or off, got {self.autocast!r}")


def recipe_config(settings: DemoSettings, recipe: str, model_path: str, task_dir: Path, **changes) -> Config:
    """The training config of one demo recipe, checked like any config; ``changes`` to dotted keys."""
    data = {"recipe": recipe, "run_dir": str(Path(settings.run_dir) / recipe), "seed": settings.seed,
            "resume": "never", "keep_last": 0, "prompts_per_step": settings.prompts_per_step,
            "max_steps": math.ceil(settings.train_prompts / settings.prompts_per_step),
            "model": {"path": model_path, "dtype": "float32", "backend": settings.backend},
            "data": {"train": str(task_dir / "train.jsonl")},
            "rollout": {"max_new_tokens": settings.max_new_tokens, "batch_size": 64,
                        "mask_truncated_completions": True, "autocast": settings.autocast},
            "optim": {"lr": settings.lr, "weight_decay": 0.0, "micro_batch_tokens": 4096},
            "osft": {"tau_s_start": settings.tau_s, "tau_s_end": settings.tau_s, "tau_t": 1.0},
            "grpo": {"num_generations": settings.num_generations, "temperature": 1.0},
            "eval": {"data": str(task_dir / "eval.jsonl"), "every": settings.eval_every,
                     "samples": settings.eval_samples, "temperature": 1.0, "greedy": True, "at_start": False}}
    return config_from_dict(data, changes)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_demo(settings: DemoSettings, *, progress: bool = True) -> dict:
    """Run the demo; returns (and writes) the results."""
    started = time.perf_counter()
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    backend = backend_name(settings.backend, device)
    model_path = resolve_model_path(settings.model)
    task_dir = run_dir / "task"
    write_task(task_dir, seed=settings.seed, train_size=settings.train_prompts, eval_size=settings.eval_prompts,
               difficulty=settings.difficulty)
    print(f"model {settings.model} ({model_path}) on {device.type}, fused loss backend: {backend}; "
          f"task: {settings.train_prompts} train / {settings.eval_prompts} eval prompts, "
          f"difficulty {settings.difficulty}")

    results = {"settings": asdict(settings), "device": device.type, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "loss_backend": backend, "recipes": {}}
    base_config = recipe_config(settings, "osft", model_path, task_dir, run_dir=str(run_dir / "base"))
    phase = time.perf_counter()
    seed_everything(settings.seed)
    lm = load_causal_lm(base_config.model, device)
    generation = generation_autocast(lm.model, settings.autocast) or lm.model.dtype
    results["generation_dtype"] = str(generation).removeprefix("torch.")
    print(f"generation in {results['generation_dtype']}, training in {str(lm.model.dtype).removeprefix('torch.')}, "
          f"attention {lm.attention}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        print("base model: evaluating")
        base = evaluate(lm, base_config, load_eval_rows(base_config), progress=bar)
    del lm
    Path(base_config.run_dir).mkdir(parents=True, exist_ok=True)
    append_eval(Path(base_config.run_dir) / "eval.jsonl", 0, base)
    results["recipes"]["base"] = {"curve": [{"step": 0, **base}], "final": base, "steps": 0, "rollout_tokens": 0,
                                  "seconds": time.perf_counter() - phase}

    def run(name: str, config: Config) -> None:
        print(f"{name}: {config.recipe}, lr {config.optim.lr:g}")
        phase = time.perf_counter()
        train(config, progress=progress)
        curve = [{"step": 0, **base}] + _read_jsonl(Path(config.run_dir) / "eval.jsonl")
        metrics = _read_jsonl(Path(config.run_dir) / "metrics.jsonl")
        results["recipes"][name] = {"curve": curve, "final": curve[-1], "steps": metrics[-1]["step"],
                                    "rollout_tokens": metrics[-1]["rollout_tokens"],
                                    "seconds": time.perf_counter() - phase}

    run("osft", recipe_config(settings, "osft", model_path, task_dir))
    group_prompts = max(1, settings.prompts_per_step // settings.num_generations)
    run("grpo", recipe_config(settings, "grpo", model_path, task_dir, prompts_per_step=group_prompts,
                              # a cap only: the token budget ends the run (unless GRPO's responses are
                              # num_generations times shorter than OSFT's)
                              max_steps=math.ceil(settings.train_prompts * settings.num_generations / group_prompts),
                              max_rollout_tokens=results["recipes"]["osft"]["rollout_tokens"]))
    if settings.ablation:
        run("osft_coupled", recipe_config(settings, "osft", model_path, task_dir, run_dir=str(run_dir / "osft_coupled"),
                                          **{"osft.tau_s_start": 1.0, "osft.tau_s_end": 1.0}))
    results["seconds"] = time.perf_counter() - started
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(results)
    (run_dir / "table.md").write_text(table + "\n")
    plot_curves(results, run_dir / "accuracy.png")
    return results


_LABELS = {"base": "base model", "osft": "OSFT (tau_s={tau_s}, tau_t=1)", "grpo": "GRPO ({n} rollouts/prompt)",
           "osft_coupled": "OSFT coupled (tau_s=tau_t=1)"}


def _label(name: str, settings: dict) -> str:
    return _LABELS[name].format(tau_s=settings["tau_s"], n=settings["num_generations"])


def format_table(results: dict) -> str:
    """A markdown table of the final evaluation of each recipe (no timings: the same seed gives the same table)."""
    settings = results["settings"]
    k = settings["eval_samples"]
    lines = [f"| recipe | steps | generated tokens | pass@1 (T=1) | greedy pass@1 | pass@{k} (T=1) | mean length |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["recipes"].items():
        final = entry["final"]
        lines.append(f"| {_label(name, settings)} | {entry['steps']} | {entry['rollout_tokens']} | "
                     f"{final['eval/pass@1']:.3f} | {final['eval/greedy_pass@1']:.3f} | "
                     f"{final[f'eval/pass@{k}']:.3f} | "
                     f"{final['eval/mean_length']:.1f} |")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    """pass@1 at T=1 (solid) and greedy pass@1 (dashed) against the optimizer step, one colour per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, entry) in enumerate(results["recipes"].items()):
        if name == "base":
            continue
        colour = f"C{index}"
        steps = [point["step"] for point in entry["curve"]]
        label = _label(name, results["settings"])
        axis.plot(steps, [p["eval/pass@1"] for p in entry["curve"]], "o-", color=colour, label=f"{label}: pass@1 T=1")
        axis.plot(steps, [p["eval/greedy_pass@1"] for p in entry["curve"]], "s--", color=colour, alpha=0.6,
                  label=f"{label}: greedy")
    settings = results["settings"]
    axis.set_xlabel("optimizer step (every step uses the same number of rollouts)")
    axis.set_ylabel(f"accuracy on {settings['eval_prompts']} held-out prompts")
    axis.set_title(f"{settings['model']} on the built-in math task (seed {settings['seed']}, {results['device']})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _quiet_libraries() -> None:
    """The demo draws its own progress bars; silence the loaders' per-file bars and notices."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="osft demo", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=_HELP[name])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{_HELP[name]} (default: {value})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = vars(parser.parse_args(argv))
    progress = not args.pop("no_progress")
    try:
        settings = DemoSettings(**args)
    except ValueError as error:
        parser.error(str(error))
    _quiet_libraries()
    results = run_demo(settings, progress=progress)
    print()
    print(format_table(results))
    print()
    for name, entry in results["recipes"].items():
        print(f"{name}: {entry['seconds']:.0f} s")
    print(f"total {results['seconds'] / 60:.1f} min; wrote {Path(settings.run_dir) / 'results.json'}, table.md, "
          f"accuracy.png")
    return 0
