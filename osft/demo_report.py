"""The demo's report from its ``results``: a table of every row's final scores with 95% intervals (and
the spread over seeds), a table of the differences between rows with their intervals, significant ones
in bold, and the curves (held-out pass@1 and GRPO's training reward against the step).

``results["recipes"][name]`` holds ``label`` and ``runs``: one entry per seed with ``curve`` (the
``eval.jsonl`` lines, ``per_prompt`` included), ``final``, ``steps``, ``rollout_tokens``, ``seconds``
and, for GRPO, ``rewards`` (the training reward of each step). ``results["comparisons"]`` lists
``[row, baseline]`` pairs.
"""
import math
from pathlib import Path
from statistics import fmean

from .evaluate import prompt_scores
from .intervals import Estimate, difference_interval, score_interval

GREEDY = "eval/greedy_pass@1"


def _metric_names(samples: int) -> list[tuple[str, str]]:
    """(metric, column title) of the table's scores."""
    return [("eval/pass@1", "pass@1 (T=1)"), (GREEDY, "greedy pass@1"),
            (f"eval/pass@{samples}", f"pass@{samples} (T=1)")]


def per_prompt_scores(run: dict, metric: str, samples: int) -> list[float]:
    """One run's final score of every held-out prompt."""
    return prompt_scores(run["final"]["per_prompt"], samples)[metric]


def row_estimate(entry: dict, metric: str, samples: int) -> Estimate:
    """The seed-averaged score and its 95% interval over the prompts."""
    runs = [per_prompt_scores(run, metric, samples) for run in entry["runs"]]
    averaged = [sum(values) / len(values) for values in zip(*runs)]
    return score_interval(averaged, (1 if metric == GREEDY else samples) * len(runs))


def seed_spread(entry: dict, metric: str) -> float | None:
    """The standard deviation over seeds of the final score (None for a single run)."""
    values = [run["final"][metric] for run in entry["runs"]]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def difference(results: dict, row: str, baseline: str, metric: str) -> Estimate:
    """``row - baseline`` over the same prompts, paired by seed when both have one run per seed."""
    samples = results["settings"]["eval_samples"]
    runs = [per_prompt_scores(run, metric, samples) for run in results["recipes"][row]["runs"]]
    bases = [per_prompt_scores(run, metric, samples) for run in results["recipes"][baseline]["runs"]]
    return difference_interval(runs, bases)


def format_table(results: dict) -> str:
    """Every row's final scores: ``mean [95% interval]``, ``± spread`` over seeds, and an arrow where the
    difference from the base model is significant."""
    samples = results["settings"]["eval_samples"]
    metrics = _metric_names(samples)
    lines = ["| recipe | seeds | steps | generated tokens | " + " | ".join(t for _, t in metrics) + " | mean length |",
             "|---|---|---|---|" + "---|" * len(metrics) + "---|"]
    for name, entry in results["recipes"].items():
        runs = entry["runs"]
        cells = []
        for metric, _ in metrics:
            estimate = row_estimate(entry, metric, samples)
            cell = f"{estimate.mean:.3f} [{estimate.low:.2f}, {estimate.high:.2f}]"
            spread = seed_spread(entry, metric)
            if spread is not None:
                cell += f" ±{spread:.3f}"
            if name != "base":
                change = difference(results, name, "base", metric)
                cell += (" ↑" if change.low > 0 else " ↓") if change.significant else ""
            cells.append(cell)
        lines.append(f"| {entry['label']} | {len(runs)} | {fmean([r['steps'] for r in runs]):.0f} | "
                     f"{fmean([r['rollout_tokens'] for r in runs]):.0f} | " + " | ".join(cells) +
                     f" | {fmean([r['final']['eval/mean_length'] for r in runs]):.1f} |")
    return "\n".join(lines)


def format_comparisons(results: dict) -> str:
    """The differences ``row - baseline`` with their 95% intervals; significant ones (the interval
    excludes 0) in bold."""
    metrics = _metric_names(results["settings"]["eval_samples"])
    lines = ["| difference | " + " | ".join(t for _, t in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for row, baseline in results["comparisons"]:
        cells = []
        for metric, _ in metrics:
            change = difference(results, row, baseline, metric)
            cell = f"{change.mean:+.3f} [{change.low:+.2f}, {change.high:+.2f}]"
            cells.append(f"**{cell}**" if change.significant else cell)
        recipes = results["recipes"]
        lines.append(f"| {recipes[row]['label']} − {recipes[baseline]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The seed means of the step and of ``key`` at each evaluation (the i-th of every run; runs stopped by
    the token budget end at different steps)."""
    points = min(len(run["curve"]) for run in runs)
    return ([fmean([run["curve"][i]["step"] for run in runs]) for i in range(points)],
            [fmean([run["curve"][i][key] for run in runs]) for i in range(points)])


def plot_curves(results: dict, path: Path) -> None:
    """Left: held-out pass@1 at T=1 against the optimizer step (seed mean; a row trained from another
    row's end continues its curve). Right: GRPO's training reward per step (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, reward) = plt.subplots(1, 2, figsize=(12, 4.5))
    recipes = results["recipes"]
    for index, (name, entry) in enumerate(recipes.items()):
        if name == "base":
            continue
        start = entry.get("starts_from")
        offset = fmean([r["steps"] for r in recipes[start]["runs"]]) if start else 0
        steps, values = _mean_curve(entry["runs"], "eval/pass@1")
        accuracy.plot([s + offset for s in steps], values, "o-", color=f"C{index % 10}", label=entry["label"])
        rewards = [run["rewards"] for run in entry["runs"] if run.get("rewards")]
        if rewards:
            width = min(len(r) for r in rewards)
            reward.plot([s + 1 + offset for s in range(width)], [fmean([r[s] for r in rewards]) for s in range(width)],
                        ".-", color=f"C{index % 10}", label=entry["label"])
    settings = results["settings"]
    accuracy.set_xlabel("optimizer step")
    accuracy.set_ylabel(f"pass@1 at T=1 on {settings['eval_prompts']} held-out prompts")
    reward.set_xlabel("optimizer step")
    reward.set_ylabel("GRPO training reward (mean over the step's rollouts)")
    for axis in (accuracy, reward):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    seeds = sorted({run["seed"] for name, entry in recipes.items() if name != "base" for run in entry["runs"]})
    figure.suptitle(f"{settings['model']} on the built-in math task ({results['device']}, "
                    f"training seeds {', '.join(map(str, seeds))})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
