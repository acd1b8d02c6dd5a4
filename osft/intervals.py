"""95% intervals for evaluation scores over held-out prompts, and for differences between two runs.

A score (pass@k, greedy pass@1) is the mean over ``m`` prompts of per-prompt values in [0, 1], each from
``samples`` completions of that prompt. Completions of one prompt are correlated, so the interval is
the Wilson score interval at the effective sample size the prompt-to-prompt spread implies: ``m`` when
each prompt is all right or all wrong, up to ``m * samples`` when the prompts are alike. Wilson's
interval stays inside [0, 1] and keeps a width when every prompt scored 0 (or 1), where a normal or
bootstrap interval collapses to a point.

A difference between two runs on the same prompts (seeds paired with the same prompts) is judged by a
normal interval whose variance adds the prompt-to-prompt spread of the seed-averaged differences and
the seed-to-seed spread of the per-seed mean differences. Both terms contain the sampling noise of the
evaluation, so the interval is conservative.
"""
import math
from dataclasses import dataclass
from statistics import fmean, pvariance

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval ``[low, high]``."""

    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for a difference)."""
        return self.low > 0 or self.high < 0


def wilson_interval(proportion: float, trials: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial ``proportion`` observed over ``trials`` (> 0, may be fractional)."""
    if not 0 <= proportion <= 1:
        raise ValueError(f"proportion must be in [0, 1], got {proportion}")
    if not trials > 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    z2 = z * z / trials
    centre = (proportion + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(proportion * (1 - proportion) / trials + z2 / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(per_prompt: list[float], samples: int) -> Estimate:
    """The mean of ``per_prompt`` scores (each in [0, 1], from ``samples`` completions) and its 95% interval."""
    if not per_prompt:
        raise ValueError("per_prompt must not be empty")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if any(not 0 <= value <= 1 for value in per_prompt):
        raise ValueError("per-prompt scores must be in [0, 1]")
    prompts, mean = len(per_prompt), fmean(per_prompt)
    variance = pvariance(per_prompt)
    # binomial variance / observed variance of one prompt's score = completions worth one prompt
    trials = prompts if variance == 0 else prompts * mean * (1 - mean) / variance
    trials = min(max(trials, prompts), prompts * samples)
    return Estimate(mean, *wilson_interval(min(max(mean, 0.0), 1.0), trials))


def difference_interval(runs: list[list[float]], baselines: list[list[float]]) -> Estimate:
    """``mean(runs) - mean(baselines)`` and its 95% interval; ``runs[s][i]``: seed ``s``'s score of prompt ``i``.

    ``baselines`` holds one list (a single run, e.g. the base model) or one per seed, paired with ``runs``.
    With one seed on both sides only the prompt-to-prompt term is left."""
    prompts = len(runs[0]) if runs else 0
    if not prompts or any(len(run) != prompts for run in runs + baselines):
        raise ValueError("every run and baseline needs the same, non-zero number of prompts")
    if len(baselines) not in (1, len(runs)):
        raise ValueError(f"baselines must hold 1 or {len(runs)} (one per seed) score lists, got {len(baselines)}")
    pairs = [(run, baselines[0] if len(baselines) == 1 else baselines[s]) for s, run in enumerate(runs)]
    per_seed = [[a - b for a, b in zip(run, base)] for run, base in pairs]
    per_prompt = [fmean([seed[i] for seed in per_seed]) for i in range(prompts)]
    mean = fmean(per_prompt)
    variance = pvariance(per_prompt) / (prompts - 1) if prompts > 1 else 0.0
    seeds = len(per_seed)
    if seeds > 1:
        variance += pvariance([fmean(seed) for seed in per_seed]) / (seeds - 1)
    half = Z95 * math.sqrt(variance)
    return Estimate(mean, mean - half, mean + half)
