"""osft.rewards on hand-labelled completions."""

import pytest


@pytest.mark.parametrize("completion,gold,expected", [
    ("12 plus 7 is 19, so the answer is \\boxed{19}.", "19", 1.0),
    ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("<answer>19</answer>", "19", 1.0),
    ("\\boxed{20}", "19", 0.0),
    ("I do not know", "19", 0.0),
    ("\\boxed{19}", "\\frac{", None),
])
def test_math_reward_on_hand_labelled_completions(completion, gold, expected):
    from osft.rewards import math_reward
    assert math_reward(["q"], [completion], answer=[gold]) == [expected]


def test_exact_match_reward():
    from osft.rewards import exact_match_reward
    completions = ["so the answer is 7.", "\\boxed{ Paris }", "<answer>8</answer>", "it is 7"]
    assert exact_match_reward([""] * 4, completions, answer=["7", "paris", "7", "7"]) == [1.0, 1.0, 0.0, 0.0]
