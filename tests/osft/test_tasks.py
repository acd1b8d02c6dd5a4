"""The built-in math task: seeded, disjoint splits, correct answers that the math reward accepts."""
import re

import pytest

from osft.rewards import math_reward
from osft.tasks import generate_task, write_task


def test_same_seed_same_task_and_disjoint_splits():
    train, held_out = generate_task(3, train_size=120, eval_size=40, difficulty=2)
    assert (train, held_out) == generate_task(3, train_size=120, eval_size=40, difficulty=2)
    assert generate_task(4, train_size=120, eval_size=40, difficulty=2)[0] != train
    assert len(train) == 120 and len(held_out) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len({r["prompt"] for r in train}) == 120


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answers_are_right_and_accepted_by_the_math_reward(difficulty):
    train, held_out = generate_task(0, train_size=40, eval_size=10, difficulty=difficulty)
    rows = train + held_out
    for row in rows:
        arithmetic = re.search(r"Compute (.+)\.$", row["prompt"])
        if arithmetic:
            assert eval(arithmetic.group(1), {}) == int(row["answer"])  # the expression holds only digits, + - * and parentheses
        else:
            assert "How many" in row["prompt"]
    completions = [f"The result is \\boxed{{{r['answer']}}}." for r in rows]
    assert math_reward([r["prompt"] for r in rows], completions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    wrong = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in rows]
    assert math_reward([r["prompt"] for r in rows], wrong, answer=[r["answer"] for r in rows]) == [0.0] * len(rows)
    solutions = [r["solution"] for r in rows]
    assert math_reward([r["prompt"] for r in rows], solutions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)


@pytest.mark.parametrize("difficulty", [0, 3])
def test_worked_solutions_compute_each_operation(difficulty):
    """Every worked line ``a op b = c`` holds, one line per operation, the last result is the answer, and
    each line starts from the previous result."""
    train, _ = generate_task(2, train_size=30, eval_size=0, difficulty=difficulty)
    for row in train:
        steps = re.findall(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)", row["solution"])
        assert len(steps) == 1 + difficulty
        for index, (left, operator, right, result) in enumerate(steps):
            assert eval(f"{left} {operator} {right}", {}) == int(result)
            if index:
                assert int(left) == int(steps[index - 1][3])
        assert int(steps[-1][3]) == int(row["answer"])
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")


def test_word_problems_follow_their_story():
    """Replaying each story's sentences in order gives its answer."""
    train, _ = generate_task(1, train_size=60, eval_size=0, difficulty=2)
    for row in train[1::2]:
        count = None
        for sentence in re.findall(r"[^.?]+[.?]", row["prompt"].split("\n\n", 1)[1]):
            if (start := re.search(r"has (\d+)", sentence)) and count is None:
                count = int(start.group(1))
            elif bought := re.search(r"buys (\d+) more", sentence):
                count += int(bought.group(1))
            elif given := re.search(r"gives away (\d+)", sentence):
                count -= int(given.group(1))
            elif "doubles" in sentence:
                count *= 2
        assert count == int(row["answer"]) and count > 0


def test_write_task_files(tmp_path):
    train_path, eval_path = write_task(tmp_path, seed=0, train_size=8, eval_size=4)
    assert len(train_path.read_text().splitlines()) == 8 and len(eval_path.read_text().splitlines()) == 4
