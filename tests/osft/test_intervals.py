"""osft.intervals: Wilson intervals against hand-computed and published values and their defining
equation, the effective sample size of correlated completions, and the paired difference over prompts
and seeds."""
import math

import pytest

from osft.intervals import Z95, difference_interval, score_interval, wilson_interval


def test_wilson_interval_matches_the_published_value_and_its_defining_equation():
    # 5 of 25: the Wilson score interval is [0.0886, 0.3913] (e.g. Newcombe 1998, method 3)
    low, high = wilson_interval(0.2, 25)
    assert (round(low, 4), round(high, 4)) == (0.0886, 0.3913)
    # its bounds are the roots of (p_hat - p)^2 = z^2 p (1 - p) / n
    for proportion, trials in [(0.2, 25), (0.4375, 7.2), (0.9, 128), (1.0, 10)]:
        for bound in wilson_interval(proportion, trials):
            assert (proportion - bound) ** 2 == pytest.approx(Z95 ** 2 * bound * (1 - bound) / trials, abs=1e-12)


def test_all_wrong_prompts_keep_an_interval_of_width_z2_over_n_plus_z2():
    estimate = score_interval([0.0] * 128, samples=4)
    assert estimate.mean == estimate.low == 0.0
    assert estimate.high == pytest.approx(Z95 ** 2 / (128 + Z95 ** 2))  # 0.0291: one observation per prompt
    estimate = score_interval([1.0] * 10, samples=4)
    assert (estimate.low, estimate.high) == pytest.approx((10 / (10 + Z95 ** 2), 1.0))


def test_score_interval_uses_the_effective_sample_size_of_the_prompts():
    # scores 0, 1/4, 1, 1/2: mean 0.4375, population variance 0.13671875; the binomial variance
    # 0.4375 * 0.5625 = 0.24609375 makes each prompt worth 1.8 completions: 7.2 trials
    estimate = score_interval([0.0, 0.25, 1.0, 0.5], samples=4)
    assert estimate.mean == 0.4375
    assert (estimate.low, estimate.high) == pytest.approx(wilson_interval(0.4375, 7.2))
    assert (estimate.low, estimate.high) == pytest.approx((0.1658, 0.7527), abs=1e-4)  # by hand
    # prompts that are all right or all wrong: one trial each (plain Wilson over prompts)
    assert score_interval([1.0, 0.0, 0.0, 1.0], samples=4) == score_interval([1.0, 0.0, 0.0, 1.0], samples=1)
    assert (score_interval([1.0, 0.0, 0.0, 1.0], samples=4).low,) == pytest.approx((wilson_interval(0.5, 4)[0],))
    # identical prompts: at most every completion counts (4 prompts x 4 samples)
    alike = score_interval([0.25, 0.5, 0.25, 0.5], samples=4)
    assert (alike.low, alike.high) == pytest.approx(wilson_interval(0.375, 16))


def test_difference_over_prompts_by_hand():
    # per-prompt differences of the seed averages: 1, 0.5, -0.5 -> mean 1/3, standard error^2 = 0.38889 / 2
    estimate = difference_interval([[1, 0, 1], [1, 1, 0]], [[0, 0, 1]])
    assert estimate.mean == pytest.approx(1 / 3)
    half = Z95 * math.sqrt((7 / 18) / 2)
    assert (estimate.low, estimate.high) == pytest.approx((1 / 3 - half, 1 / 3 + half))
    assert (round(estimate.low, 4), round(estimate.high, 4)) == (-0.5309, 1.1976)
    assert not estimate.significant


def test_difference_adds_the_seed_to_seed_spread():
    # the prompts agree within each seed average, the seeds do not: mean 0.5, variance 0.25 over 2 seeds
    estimate = difference_interval([[1, 1], [0, 0]], [[0, 0]])
    assert (estimate.mean, estimate.low, estimate.high) == pytest.approx((0.5, 0.5 - Z95 * 0.5, 0.5 + Z95 * 0.5))
    # paired baselines: seed s against baseline s
    assert difference_interval([[1, 1], [1, 1]], [[0, 0], [1, 1]]).mean == 0.5
    # a shift on every prompt in every seed is significant
    assert difference_interval([[1.0] * 40, [1.0] * 40, [0.75] * 40], [[0.0] * 40]).significant


def test_bad_input_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="trials must be > 0"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"proportion must be in \[0, 1\]"):
        wilson_interval(1.5, 3)
    with pytest.raises(ValueError, match="per_prompt must not be empty"):
        score_interval([], 4)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        score_interval([0.5], 0)
    with pytest.raises(ValueError, match="same, non-zero number of prompts"):
        difference_interval([[1, 0]], [[1]])
    with pytest.raises(ValueError, match="baselines must hold 1 or 3"):
        difference_interval([[1], [0], [1]], [[0], [1]])
