"""``osft demo``: the three recipes from the same pretrained model on the built-in math task, with 95%
intervals on every score.

1. Write the task (:mod:`osft.tasks`) into ``run_dir/task`` and evaluate the base model on the
   held-out prompts: pass@1 and pass@k at temperature 1 (``eval_samples`` per prompt, unbiased
   estimator), greedy pass@1 and the mean response length, each score with its 95% interval.
2. OSFT: one rollout per prompt at ``tau_s``, trained at ``tau_t = 1``, no reward.
3. GRPO from the same base (``num_generations`` rollouts per prompt, math reward, group-normalized
   advantages), twice: with OSFT's generated-token budget, and with OSFT's optimizer steps and prompts.
4. Optionally the coupled ablation, OSFT with ``tau_s = tau_t = 1``, whose expected gradient is zero.

``--pear`` runs the PEAR pipeline instead: the base model prompted with worked examples (the behavior
policy) writes solutions of the training prompts, recording the logprob of every token it samples;
SFT and PEAR (token, block and sequence level) train on them from the base model, and the same GRPO
stage follows each of them.

Trained rows are repeated over ``seeds`` seeds (training seeds ``seed + seed_offset + i``; the task
and the base model's evaluation use ``seed``). Runs split over seeds with ``seed_offset`` share the task
and the base evaluation; ``osft demo --merge DIR ...`` joins them. Every row is evaluated every
``eval_every`` steps and at its end.
Writes ``results.json`` (every prompt's counts included), ``accuracy.png`` and ``table.md`` into
``run_dir`` and prints the tables. The same settings give the same tables.
"""
import argparse
import copy
import json
import math
import shutil
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from osft_kernels import backend_name
from osft_kernels.device_info import describe

from .behavior import sample_behavior_data
from .config import Config, RolloutConfig, config_from_dict
from .demo_report import format_comparisons, format_table, plot_curves
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import default_device, load_causal_lm
from .packaged import resolve_model_path
from .rollout import generation_autocast, make_engine
from .run_dir import Checkpoints
from .tasks import MAX_DIFFICULTY, generate_task, write_task
from .train import seed_everything, train

_HELP = {
    "model": "a packaged model (smollm2-135m, gemma3-270m) or a local transformers directory",
    "run_dir": "where the task, each row's runs, results.json, table.md and accuracy.png go",
    "seed": "seeds the task, the base model's evaluation and the first training seed",
    "seeds": "training seeds per trained row (seed, seed + 1, ...): mean and spread over them",
    "seed_offset": "the first training seed is seed + this (split the seeds over runs, then --merge them)",
    "difficulty": "the task's difficulty: 1 + N operations, larger operands every 2 levels",
    "train_prompts": "training prompts (OSFT: one rollout each); the GRPO rows get OSFT's tokens or steps",
    "eval_prompts": "held-out prompts",
    "eval_samples": "completions per held-out prompt at temperature 1 (pass@1 .. pass@N)",
    "prompts_per_step": "prompts per optimizer step (OSFT, SFT, PEAR and equal-steps GRPO; equal-token GRPO: "
                        "this / num_generations prompts)",
    "num_generations": "GRPO rollouts per prompt",
    "tau_s": "OSFT's sampling temperature (training temperature tau_t = 1)",
    "lr": "AdamW learning rate of OSFT, SFT and PEAR",
    "grpo_lr": "AdamW learning rate of GRPO",
    "grpo_temperature": "GRPO's sampling and training temperature",
    "max_new_tokens": "response length limit of every rollout and evaluation (longer ones are cut, no loss)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "ablation": "also run OSFT with tau_s = tau_t = 1",
    "pear": "run the PEAR pipeline: behavior data, SFT and PEAR (token, block, sequence), then GRPO from each",
    "behavior_examples": "--pear: worked examples in the behavior policy's prompt",
    "behavior_samples": "--pear: behavior solutions sampled per training prompt (correct, complete ones kept)",
    "behavior_temperature": "--pear: the behavior policy's sampling temperature",
    "behavior_keep": "--pear: the behavior samples kept as training data: correct (judged right and complete) "
                     "or complete (every one that ends within max_new_tokens)",
    "rl_steps": "--pear: optimizer steps of the GRPO stage after SFT and each PEAR level",
    "rl_lr": "--pear: AdamW learning rate of that GRPO stage (from the SFT start, 5e-5 made responses run to the "
             "length cap and 1e-4 collapsed the reward)",
    "backend": "the fused loss's backend: auto, torch, triton, reference",
    "autocast": "generation (rollouts and evaluation) under bfloat16 autocast: bfloat16, off, or auto (where "
                "the hardware multiplies bfloat16 natively: AVX512-BF16 or AMX CPUs, CUDA GPUs)",
}


@dataclass
class DemoSettings:
    """The demo's knobs (see ``_HELP``)."""

    model: str = "smollm2-135m"
    run_dir: str = "runs/demo"
    seed: int = 0
    seeds: int = 1
    seed_offset: int = 0
    difficulty: int = 0
    train_prompts: int = 48
    eval_prompts: int = 24
    eval_samples: int = 4
    prompts_per_step: int = 8
    num_generations: int = 4
    tau_s: float = 0.6
    lr: float = 2e-5
    grpo_lr: float = 1e-4
    grpo_temperature: float = 1.0
    max_new_tokens: int = 96
    eval_every: int = 0
    ablation: bool = False
    pear: bool = False
    behavior_examples: int = 2
    behavior_samples: int = 4
    behavior_temperature: float = 1.0
    behavior_keep: str = "correct"
    rl_steps: int = 6
    rl_lr: float = 2e-5
    backend: str = "auto"
    autocast: str = "auto"

    def __post_init__(self):
        for name in ("seeds", "train_prompts", "eval_prompts", "eval_samples", "prompts_per_step", "max_new_tokens",
                     "behavior_examples", "behavior_samples", "rl_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if not 0 <= self.difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"--difficulty must be in [0, {MAX_DIFFICULTY}], got {self.difficulty}")
        if self.seed_offset < 0:
            raise ValueError(f"--seed-offset must be >= 0, got {self.seed_offset}")
        if not (0 <= self.seed and self.seed + self.seed_offset + self.seeds <= 2**32):
            raise ValueError(f"--seed .. --seed + --seed-offset + --seeds - 1 must lie in [0, 2**32) (what the RNG "
                             f"seeding functions accept), got {self.seed}, {self.seed_offset} and {self.seeds}")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (GRPO compares rollouts within a group), "
                             f"got {self.num_generations}")
        if not 0 < self.tau_s <= 1:
            raise ValueError(f"--tau-s must be in (0, 1] (OSFT samples at or below tau_t = 1), got {self.tau_s}")
        for name in ("lr", "grpo_lr", "rl_lr", "grpo_temperature", "behavior_temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        if self.autocast not in typing.get_args(typing.get_type_hints(RolloutConfig)["autocast"]):
            raise ValueError(f"--autocast must be auto, bfloat16 or off, got {self.autocast!r}")
        if self.behavior_keep not in ("correct", "complete"):
            raise ValueError(f"--behavior-keep must be correct or complete, got {self.behavior_keep!r}")
        if self.pear and self.ablation:
            raise ValueError("--ablation belongs to the OSFT comparison; run it without --pear")


def recipe_config(settings: DemoSettings, recipe: str, model_path: str, task_dir: Path, **changes) -> Config:
    """The training config of one demo run, checked like any config; ``changes`` to dotted keys."""
    data = {"recipe": recipe, "run_dir": str(Path(settings.run_dir) / recipe), "seed": settings.seed,
            "resume": "never", "keep_last": 0, "prompts_per_step": settings.prompts_per_step,
            "max_steps": math.ceil(settings.train_prompts / settings.prompts_per_step),
            "model": {"path": model_path, "dtype": "float32", "backend": settings.backend},
            "data": {"train": str(task_dir / "train.jsonl")},
            "rollout": {"max_new_tokens": settings.max_new_tokens, "batch_size": 128,
                        "mask_truncated_completions": True, "autocast": settings.autocast},
            "optim": {"lr": settings.lr, "weight_decay": 0.0, "micro_batch_tokens": 4096},
            "osft": {"tau_s_start": settings.tau_s, "tau_s_end": settings.tau_s, "tau_t": 1.0},
            "grpo": {"num_generations": settings.num_generations, "temperature": settings.grpo_temperature},
            "eval": {"data": str(task_dir / "eval.jsonl"), "every": settings.eval_every,
                     "samples": settings.eval_samples, "temperature": 1.0, "greedy": True, "at_start": False}}
    return config_from_dict(data, {**({"optim.lr": settings.grpo_lr} if recipe == "grpo" else {}), **changes})


def training_seeds(settings: DemoSettings) -> range:
    first = settings.seed + settings.seed_offset
    return range(first, first + settings.seeds)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Demo:
    """One demo invocation: the task, the base model's evaluation, and the results its rows add up to."""

    def __init__(self, settings: DemoSettings, progress: bool):
        self.settings, self.progress = settings, progress
        self.started = time.perf_counter()
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = default_device()
        self.model_path = resolve_model_path(settings.model)
        self.task_dir = self.run_dir / "task"
        write_task(self.task_dir, seed=settings.seed, train_size=settings.train_prompts,
                   eval_size=settings.eval_prompts, difficulty=settings.difficulty)
        backend = backend_name(settings.backend, self.device)
        hardware = describe(self.device)
        print(f"model {settings.model} ({self.model_path}) on {hardware}; fused loss backend: {backend}; task: "
              f"{settings.train_prompts} train / {settings.eval_prompts} eval prompts, difficulty "
              f"{settings.difficulty}; training seeds {', '.join(map(str, training_seeds(settings)))}")
        self.results = {"settings": asdict(settings), "device": self.device.type, "hardware": hardware,
                        "threads": torch.get_num_threads(), "loss_backend": backend, "recipes": {},
                        "comparisons": []}

    def config(self, recipe: str, name: str, seed: int, **changes) -> Config:
        return recipe_config(self.settings, recipe, self.model_path, self.task_dir, seed=seed,
                             run_dir=str(self.run_dir / name / f"seed-{seed}"), **changes)

    def row(self, name: str, label: str, starts_from: str | None = None) -> None:
        self.results["recipes"][name] = {"label": label, "runs": []}
        if starts_from:
            self.results["recipes"][name]["starts_from"] = starts_from

    def evaluate_base(self) -> None:
        """The base model's row: one evaluation with ``seed``; also loads the behavior policy for ``--pear``."""
        settings = self.settings
        config = self.config("osft", "base", settings.seed)
        phase = time.perf_counter()
        seed_everything(settings.seed)
        lm = load_causal_lm(config.model, self.device)
        generation = generation_autocast(lm.model, settings.autocast) or lm.model.dtype
        self.results["generation_dtype"] = str(generation).removeprefix("torch.")
        print(f"generation in {self.results['generation_dtype']}, training in "
              f"{str(lm.model.dtype).removeprefix('torch.')}, attention {lm.attention}")
        engine = make_engine(lm, config)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not self.progress) as bar:
            print("base model: evaluating")
            evaluation = evaluate(lm, config, load_eval_rows(config), engine, progress=bar)
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        append_eval(Path(config.run_dir) / "eval.jsonl", 0, evaluation)
        final = {"step": 0, **evaluation.metrics, "per_prompt": evaluation.per_prompt}
        self.row("base", "base model")
        self.results["recipes"]["base"]["runs"].append(
            {"seed": settings.seed, "curve": [final], "final": final, "steps": 0, "rollout_tokens": 0,
             "seconds": time.perf_counter() - phase})
        if settings.pear:
            self.write_behavior_data(lm, config, engine)

    def write_behavior_data(self, lm, config: Config, engine) -> None:
        """``run_dir/behavior.jsonl``: the base model prompted with worked examples (rows of the task generated
        after the train and held-out ones) solves the training prompts."""
        settings = self.settings
        rows = _read_jsonl(self.task_dir / "train.jsonl")
        examples = generate_task(settings.seed, train_size=settings.train_prompts + settings.eval_prompts,
                                 eval_size=settings.behavior_examples, difficulty=settings.difficulty)[1]
        phase = time.perf_counter()
        print(f"behavior policy: {settings.behavior_examples} worked examples, T={settings.behavior_temperature:g}, "
              f"{settings.behavior_samples} samples per training prompt")
        data = sample_behavior_data(lm, config, engine, rows, examples, samples=settings.behavior_samples,
                                    temperature=settings.behavior_temperature, keep=settings.behavior_keep)
        if not data.rows:
            raise RuntimeError(f"the behavior policy left none of {data.sampled} samples ({data.truncated} cut, "
                               f"{data.wrong} wrong, {data.not_retokenized} not re-tokenizing): nothing to train "
                               "on; raise --behavior-samples or --max-new-tokens")
        (self.run_dir / "behavior.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data.rows))
        self.results["behavior"] = {"examples": examples, "sampled": data.sampled, "kept": data.kept,
                                    "truncated": data.truncated, "wrong": data.wrong,
                                    "not_retokenized": data.not_retokenized, "seconds": time.perf_counter() - phase}
        print(f"behavior data: kept {data.kept} of {data.sampled} ({data.truncated} cut, {data.wrong} wrong, "
              f"{data.not_retokenized} not re-tokenizing)")

    def train_row(self, name: str, config: Config, start: dict) -> dict:
        """Train ``config`` into row ``name``; its curve starts at ``start`` (the evaluation it starts from)."""
        print(f"{name} (seed {config.seed}): {config.recipe}, lr {config.optim.lr:g}")
        phase = time.perf_counter()
        train(config, progress=self.progress)
        run_dir = Path(config.run_dir)
        curve = [{**start, "step": 0}] + _read_jsonl(run_dir / "eval.jsonl")
        metrics = _read_jsonl(run_dir / "metrics.jsonl")
        run = {"seed": config.seed, "curve": curve, "final": curve[-1], "steps": metrics[-1]["step"],
               "rollout_tokens": metrics[-1]["rollout_tokens"], "seconds": time.perf_counter() - phase}
        if config.recipe == "grpo":
            run["rewards"] = [m["reward"] for m in metrics]
        self.results["recipes"][name]["runs"].append(run)
        return run

    def finish(self) -> dict:
        self.results["seconds"] = time.perf_counter() - self.started
        write_outputs(self.results, self.run_dir)
        return self.results


def write_outputs(results: dict, run_dir: Path) -> None:
    """``results.json``, ``table.md`` and ``accuracy.png`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "table.md").write_text(report(results) + "\n")
    plot_curves(results, run_dir / "accuracy.png")


_PER_RUN = ("seeds", "seed_offset", "run_dir")  # the settings that may differ between runs to merge


def merge_results(parts: list[dict]) -> dict:
    """One demo's results from runs that split its training seeds (``seed_offset``): the same settings
    otherwise, so the same task, base evaluation and behavior data; each trained row's runs joined in
    seed order. Refuses runs that differ in anything else, repeat a seed or leave one out."""
    if not parts:
        raise ValueError("--merge needs at least one results directory")
    first = parts[0]
    for part in parts[1:]:
        for key, value in first["settings"].items():
            if key not in _PER_RUN and part["settings"][key] != value:
                raise ValueError(f"cannot merge runs with different --{key.replace('_', '-')}: "
                                 f"{value!r} and {part['settings'][key]!r}")
        if [run["curve"] for run in part["recipes"]["base"]["runs"]] != \
                [run["curve"] for run in first["recipes"]["base"]["runs"]] or \
                {**part.get("behavior", {}), "seconds": 0} != {**first.get("behavior", {}), "seconds": 0}:
            raise ValueError("cannot merge runs whose base-model evaluation or behavior data differ (another "
                             "machine or version?)")
    merged = copy.deepcopy(first)
    for name, entry in merged["recipes"].items():
        if name != "base":
            entry["runs"] = sorted((run for part in parts for run in part["recipes"][name]["runs"]),
                                   key=lambda run: run["seed"])
    seeds = [run["seed"] for run in next(e for n, e in merged["recipes"].items() if n != "base")["runs"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cannot merge runs that repeat a training seed: {seeds}")
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"cannot merge runs whose training seeds are not consecutive: {seeds} (the report "
                         "names them by the first and their number)")
    merged["settings"].update(seeds=len(seeds), seed_offset=seeds[0] - first["settings"]["seed"])
    merged["seconds"] = sum(part["seconds"] for part in parts)
    return merged


def _grpo_label(settings: DemoSettings, budget: str) -> str:
    return (f"GRPO, {budget} (G={settings.num_generations}, lr {settings.grpo_lr:g}, "
            f"T={settings.grpo_temperature:g})")


def run_demo(settings: DemoSettings, *, progress: bool = True) -> dict:
    """Run the demo (``settings.pear``: the PEAR pipeline); returns (and writes) the results."""
    demo = Demo(settings, progress)
    demo.evaluate_base()
    (run_pear if settings.pear else run_osft_grpo)(demo)
    return demo.finish()


def run_osft_grpo(demo: Demo) -> None:
    """OSFT, GRPO at OSFT's generated tokens, GRPO at OSFT's steps and prompts (and the coupled ablation)."""
    settings, base = demo.settings, demo.results["recipes"]["base"]["runs"][0]["final"]
    demo.row("osft", f"OSFT (tau_s={settings.tau_s:g}, tau_t=1)")
    demo.row("grpo_tokens", _grpo_label(settings, "OSFT's generated tokens"))
    demo.row("grpo_steps", _grpo_label(settings, "OSFT's steps and prompts"))
    if settings.ablation:
        demo.row("osft_coupled", "OSFT coupled (tau_s=tau_t=1)")
    steps = math.ceil(settings.train_prompts / settings.prompts_per_step)
    group_prompts = max(1, settings.prompts_per_step // settings.num_generations)
    for seed in training_seeds(settings):
        osft = demo.train_row("osft", demo.config("osft", "osft", seed), base)
        # each step uses as many rollouts as an OSFT step; the token budget ends the run (the step cap only
        # guards against responses num_generations times shorter than OSFT's)
        demo.train_row("grpo_tokens", demo.config("grpo", "grpo_tokens", seed, prompts_per_step=group_prompts,
                                                  max_steps=steps * settings.num_generations,
                                                  max_rollout_tokens=osft["rollout_tokens"]), base)
        demo.train_row("grpo_steps", demo.config("grpo", "grpo_steps", seed), base)
        if settings.ablation:
            demo.train_row("osft_coupled", demo.config("osft", "osft_coupled", seed,
                                                       **{"osft.tau_s_start": 1.0, "osft.tau_s_end": 1.0}), base)
    demo.results["comparisons"] = [["osft", "base"], ["grpo_tokens", "base"], ["grpo_steps", "base"],
                                   ["osft", "grpo_tokens"], ["osft", "grpo_steps"]] + \
        ([["osft", "osft_coupled"]] if settings.ablation else [])


PEAR_LEVELS = ("token", "block", "sequence")


def run_pear(demo: Demo) -> None:
    """SFT and PEAR at each level on the behavior data from the base model (one epoch), then the same GRPO
    stage (``rl_steps`` steps of OSFT's prompts per step) from each one's final weights."""
    settings, base = demo.settings, demo.results["recipes"]["base"]["runs"][0]["final"]
    offline = {"sft": ("sft", {}, "SFT")}
    offline.update({f"pear_{level}": ("pear", {"pear.level": level}, f"PEAR, {level} level")
                    for level in PEAR_LEVELS})
    for name, (_, _, label) in offline.items():
        demo.row(name, f"{label} on the behavior data")
    for name, (_, _, label) in offline.items():
        demo.row(f"{name}+grpo", f"{label}, then GRPO ({settings.rl_steps} steps, lr {settings.rl_lr:g})",
                 starts_from=name)
    rows = len((demo.run_dir / "behavior.jsonl").read_text().splitlines())
    for seed in training_seeds(settings):
        for name, (recipe, changes, _) in offline.items():
            config = demo.config(recipe, name, seed, keep_last=1, max_steps=math.ceil(rows / settings.prompts_per_step),
                                 **{"data.train": str(demo.run_dir / "behavior.jsonl")}, **changes)
            start = demo.train_row(name, config, base)
            checkpoints = Checkpoints(Path(config.run_dir), 1)
            demo.train_row(f"{name}+grpo", demo.config("grpo", f"{name}+grpo", seed, max_steps=settings.rl_steps,
                                                       **{"model.path": str(checkpoints.latest()),
                                                          "optim.lr": settings.rl_lr}), start["final"])
            shutil.rmtree(checkpoints.root)  # 1.6 GB each for the 135M model, with the optimizer state
    demo.results["comparisons"] = (
        [[name, "base"] for name in offline] + [[f"pear_{level}", "sft"] for level in PEAR_LEVELS]
        + [[f"{name}+grpo", name] for name in offline]
        + [[f"pear_{level}+grpo", "sft+grpo"] for level in PEAR_LEVELS])


def report(results: dict) -> str:
    """The scores table and the differences table."""
    return (format_table(results) + "\n\nDifferences (95% intervals over the held-out prompts and the seeds; "
            "bold: significant):\n\n" + format_comparisons(results))


def _quiet_libraries() -> None:
    """The demo draws its own progress bars; silence the loaders' per-file bars and notices, and the note
    that the optimizer state of ``--pear``'s intermediate checkpoints is written by one process."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
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
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="instead of running, join the results of runs "
                        "that split the training seeds (--seed-offset) into --run-dir")
    args = vars(parser.parse_args(argv))
    progress, merge = not args.pop("no_progress"), args.pop("merge")
    if merge:
        try:
            results = merge_results([json.loads((Path(d) / "results.json").read_text()) for d in merge])
        except (OSError, ValueError) as error:
            parser.error(str(error))
        write_outputs(results, Path(args["run_dir"]))
        print(report(results))
        print(f"wrote {Path(args['run_dir']) / 'results.json'}, table.md, accuracy.png")
        return 0
    try:
        settings = DemoSettings(**args)
    except ValueError as error:
        parser.error(str(error))
    _quiet_libraries()
    results = run_demo(settings, progress=progress)
    print()
    print(report(results))
    print()
    if "behavior" in results:
        print(f"behavior data: {results['behavior']['seconds']:.0f} s")
    for name, entry in results["recipes"].items():
        print(f"{name}: " + ", ".join(f"{run['seconds']:.0f} s" for run in entry["runs"]))
    print(f"total {results['seconds'] / 60:.1f} min; wrote {Path(settings.run_dir) / 'results.json'}, table.md, "
          f"accuracy.png")
    return 0
