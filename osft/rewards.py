"""Rewards: ``reward(prompts, completions, **columns) -> list[float | None]``, one value per
completion; ``None`` when the completion cannot be judged: the gold answer is missing (None or
blank) or does not parse. Columns are the dataset's, one entry per completion (``answer`` for both
rewards here)."""
import re
import threading


def _timeout() -> int | None:
    # math-verify's timeouts use signals, which only work in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


def strip_answer_tags(text: str) -> str:
    """``<answer>19</answer>`` -> `` 19 ``: math-verify does not look inside such tags."""
    return re.sub(r"</?answer>", " ", text)


def _gold(answer) -> str | None:
    """The gold answer as text; None when it is missing (None or blank), so it cannot be judged."""
    text = "" if answer is None else str(answer)
    return text if text.strip() else None


def math_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the completion's final answer (``\\boxed{}``, ``$...$`` or a plain expression, found by
    math-verify) equals the gold ``answer`` mathematically, 0.0 when not, None when the gold answer
    is missing or does not parse."""
    from math_verify import parse, verify

    rewards = []
    for completion, gold in zip(completions, map(_gold, answer), strict=True):
        gold_parsed = gold is not None and (
            parse(gold, fallback_mode="no_fallback", parsing_timeout=_timeout())
            or parse(f"${gold}$", fallback_mode="no_fallback", parsing_timeout=_timeout()))
        if not gold_parsed:
            rewards.append(None)
            continue
        predicted = parse(strip_answer_tags(completion), parsing_timeout=_timeout())
        rewards.append(1.0 if predicted and verify(gold_parsed, predicted, timeout_seconds=_timeout()) else 0.0)
    return rewards


def final_answer(completion: str) -> str:
    """The last ``\\boxed{...}``, else the text after the last "answer is", else the whole completion."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return boxed[-1]
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    if tagged:
        return tagged[-1]
    parts = re.split(r"answer is", completion, flags=re.IGNORECASE)
    return parts[-1] if len(parts) > 1 else completion


def _normalize(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def exact_match_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the completion's final answer equals ``answer`` after lower-casing and collapsing spaces,
    0.0 when not, None when the gold answer is missing."""
    return [None if a is None else float(_normalize(final_answer(c)) == _normalize(a))
            for c, a in zip(completions, map(_gold, answer), strict=True)]


REWARDS = {"math": math_reward, "exact_match": exact_match_reward}
