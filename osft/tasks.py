"""A built-in verifiable math task, generated from a seed: multi-step integer arithmetic and short
word problems, split into disjoint train and held-out eval sets. Each row has a ``prompt`` (text),
an integer ``answer`` that :func:`osft.rewards.math_reward` checks, and a worked ``solution`` (one
line per operation, then the boxed answer) for few-shot prompts.

``difficulty`` sets the number of operations (1 + difficulty) and the operand range (up to
``10 ** (1 + difficulty // 2)``), up to ``MAX_DIFFICULTY``; the demo picks the level by measuring
the base model.
"""
import json
import random
from pathlib import Path

INSTRUCTION = "Give a short solution and put the final answer within \\boxed{{}}.\n\n{question}"

# 21 operations on operands of up to 11 digits: prompts of a few hundred characters, already far
# beyond what the packaged models solve (the prompt grows with the square of the level)
MAX_DIFFICULTY = 20
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]


def _apply(value: int, operator: str, operand: int) -> tuple[int, str]:
    """The result and the worked line ``value operator operand = result``."""
    result = {"+": value + operand, "-": value - operand, "*": value * operand}[operator]
    return result, f"{value} {operator} {operand} = {result}"


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, int, list[str]]:
    high = 10 ** (1 + difficulty // 2)
    value = rng.randint(1, high)
    expression, steps = str(value), []
    for _ in range(1 + difficulty):
        operator = rng.choice("+-*") if abs(value) < high else rng.choice("+-")
        operand = rng.randint(2, 9) if operator == "*" else rng.randint(1, high)
        if operator == "*" and not expression.isdigit():
            expression = f"({expression})"
        expression = f"{expression} {operator} {operand}"
        value, step = _apply(value, operator, operand)
        steps.append(step + ".")
    return f"Compute {expression}.", value, steps


def _word_problem(rng: random.Random, difficulty: int) -> tuple[str, int, list[str]]:
    high = 10 ** (1 + difficulty // 2)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    count = rng.randint(2, high)
    sentences, steps = [f"{name} has {count} {item}."], [f"{name} starts with {count} {item}."]
    for _ in range(1 + difficulty):
        kind = rng.choice(["buys", "gives", "doubles"] if count < high else ["buys", "gives"])
        if kind == "buys":
            more = rng.randint(1, high)
            sentences.append(f"Then {name} buys {more} more.")
            count, step = _apply(count, "+", more)
            steps.append(f"Buying {more} more: {step}.")
        elif kind == "gives" and count > 1:
            fewer = rng.randint(1, count - 1)
            sentences.append(f"Then {name} gives away {fewer}.")
            count, step = _apply(count, "-", fewer)
            steps.append(f"Giving away {fewer}: {step}.")
        else:
            sentences.append(f"Then {name} doubles the {item}.")
            count, step = _apply(count, "*", 2)
            steps.append(f"Doubling: {step}.")
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), count, steps


def generate_task(seed: int = 0, *, train_size: int = 256, eval_size: int = 64,
                  difficulty: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)``: distinct questions, half arithmetic and half word problems."""
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in [0, {MAX_DIFFICULTY}], got {difficulty}")
    if train_size < 0 or eval_size < 0:
        raise ValueError("train_size and eval_size must be >= 0")
    rng = random.Random(seed)
    seen, rows = set(), []
    attempts = 0
    while len(rows) < train_size + eval_size:
        attempts += 1
        if attempts > 100 * (train_size + eval_size) + 1000:
            raise ValueError(f"difficulty {difficulty} cannot produce {train_size + eval_size} distinct questions")
        make = _arithmetic if len(rows) % 2 == 0 else _word_problem
        question, answer, steps = make(rng, difficulty)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": INSTRUCTION.format(question=question), "answer": str(answer),
                     "solution": "\n".join(steps) + f"\n\nThe answer is \\boxed{{{answer}}}."})
    return rows[:train_size], rows[train_size:]


def write_task(directory: Path, **kwargs) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of :func:`generate_task` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, rows in zip(paths, generate_task(**kwargs)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths
