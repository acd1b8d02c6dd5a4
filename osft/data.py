"""Training data from local files, the prompt formatting, and the tokenized batches the recipes train on."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from osft_kernels import target_mask

from .config import DataConfig

IGNORE = -100


class DataError(ValueError):
    """A data file or row that cannot be used, with the file, line or row, and column."""


class Row(dict):
    """A data row that remembers where it was read (``where``: the file and line or row), for error messages."""

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where


def where(row: dict) -> str:
    """The file and line or row of ``row`` (rows made in code: "a data row")."""
    return getattr(row, "where", "a data row")


def load_rows(path: str, required: list[str]) -> list[dict]:
    """The rows of a local ``.jsonl`` (one JSON object per line), ``.json`` (an array of objects, or
    one object per line) or ``.parquet`` file, as :class:`Row`.

    Raises :class:`DataError` naming the file and line (``.jsonl``) or row index (from 0) when the
    file is empty or unreadable, or a row lacks a ``required`` column or holds null there; e.g. a
    null gold answer is refused here rather than left for the reward, which could not judge it.
    """
    kind = Path(path).suffix
    if kind not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"data file {path} must end in .jsonl, .json or .parquet")
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist")
    rows = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[kind](path)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    for row in rows:
        for column in required:
            if column not in row:
                raise DataError(f"{row.where} has no column {column!r} (columns: {sorted(row)})")
            if row[column] is None:
                raise DataError(f"{row.where}: column {column!r} is null")
    return rows


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            at = f"data file {path} line {number}"
            try:
                value = json.loads(line.rstrip(b"\r\n"))
            except json.JSONDecodeError as error:
                raise DataError(f"{at} column {error.colno}: not valid JSON ({error.msg})") from None
            except UnicodeDecodeError as error:
                raise DataError(f"{at} byte {error.start + 1}: not UTF-8 text") from None
            if not isinstance(value, dict):
                raise DataError(f"{at}: expected a JSON object, got {type(value).__name__}")
            rows.append(Row(value, at))
    return rows


def _read_json(path: str) -> list[Row]:
    text = Path(path).read_bytes()
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several values: JSON lines
            return _read_jsonl(path)
        raise DataError(f"data file {path} line {error.lineno} column {error.colno}: not valid JSON "
                        f"({error.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text") from None
    if not isinstance(value, list):  # a single object: JSON lines
        return _read_jsonl(path)
    rows = []
    for index, item in enumerate(value):
        at = f"data file {path} row index {index}"
        if not isinstance(item, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(item).__name__}")
        rows.append(Row(item, at))
    return rows


def _read_parquet(path: str) -> list[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"data file {path} is not a readable parquet file: {error}") from None
    return [Row(row, f"data file {path} row index {index}") for index, row in enumerate(table.to_pylist())]


def prompt_text(prompt, tokenizer) -> str:
    """Chat messages (or a plain string, as a user message) rendered with the tokenizer's chat
    template and the generation prompt; a plain string as is when there is no template."""
    if isinstance(prompt, str) and not tokenizer.chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not tokenizer.chat_template:
        raise ValueError("chat-message prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Sequences:
    """Prompt + response token ids, right-padded: ``input_ids [B, T]``, ``attention_mask [B, T]`` and
    ``labels [B, T]`` holding the response tokens and ``IGNORE`` elsewhere (labels[t] is the token at
    t, so the loss uses ``shift=True``).

    ``token_values``: per-target float tensors ``[B, T - 1]``, in the coordinates of
    :attr:`target_mask` and of the fused ops' outputs (entry t belongs to ``labels[:, t + 1]``; e.g.
    sampling logprobs of the response tokens); ``row_values``: per-sequence tensors ``[B]`` (e.g.
    advantages).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_values: dict[str, Tensor] = field(default_factory=dict)
    row_values: dict[str, Tensor] = field(default_factory=dict)

    @property
    def target_mask(self) -> Tensor:
        """Bool ``[B, T - 1]``: which shifted targets ``labels[:, 1:]`` carry loss."""
        return target_mask(self.labels, IGNORE, shift=True)

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())

    def _map(self, rows=slice(None), width=None, device=None) -> "Sequences":
        def tokens(x: Tensor) -> Tensor:
            return x[rows, :width].to(device) if device else x[rows, :width]

        def targets(x: Tensor) -> Tensor:
            cut = None if width is None else width - 1
            return x[rows, :cut].to(device) if device else x[rows, :cut]

        def per_row(x: Tensor) -> Tensor:
            return x[rows].to(device) if device else x[rows]

        return Sequences(tokens(self.input_ids), tokens(self.attention_mask), tokens(self.labels),
                         {k: targets(v) for k, v in self.token_values.items()},
                         {k: per_row(v) for k, v in self.row_values.items()})

    def select(self, rows: slice) -> "Sequences":
        return self._map(rows=rows)

    def truncate(self, width: int) -> "Sequences":
        return self._map(width=width)

    def to(self, device) -> "Sequences":
        return self._map(device=device)

    def drop_targets(self, rows: list[bool]) -> None:
        """Take the loss off the sequences where ``rows`` is True (their labels become ``IGNORE``)."""
        self.labels[torch.tensor(rows, dtype=torch.bool)] = IGNORE


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         response_values: dict[str, list[list[float]]] | None = None) -> Sequences:
    """Right-padded sequences of ``prompt + response`` with labels on the response tokens;
    ``response_values`` (one value per response token) become ``token_values`` at those targets (a
    first response token with an empty prompt is no target and has none)."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE, dtype=torch.long)
    values = {name: torch.zeros(len(prompts), length - 1) for name in response_values or {}}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt + response
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, len(prompt):len(ids)] = torch.tensor(response, dtype=torch.long)
        skipped = 0 if prompt else 1  # labels[:, 0] is no target
        for name, per_response in (response_values or {}).items():
            target_values = torch.tensor(per_response[i][skipped:], dtype=torch.float32)
            values[name][i, len(prompt) + skipped - 1:len(ids) - 1] = target_values
    return Sequences(input_ids, attention_mask, labels, values)


def micro_batches(sequences: Sequences, token_budget: int, *, padding_free: bool = False) -> list[Sequences]:
    """Consecutive groups of rows whose size fits ``token_budget`` (a single row always forms a group):
    the padded size ``rows * max length``, or with ``padding_free`` the tokens themselves (the
    decoder then runs them back to back, :func:`osft.model.packed_hidden_states`)."""
    lengths = sequences.attention_mask.sum(1).tolist()

    def size(start: int, end: int) -> int:
        group = lengths[start:end]
        return sum(group) if padding_free else len(group) * max(group)

    groups, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and size(start, end + 1) <= token_budget:
            end += 1
        groups.append(sequences.select(slice(start, end)).truncate(max(lengths[start:end])))
        start = end
    return groups


def _prompt(row: dict, column: str):
    """``row[column]``, refused unless it is text or chat messages."""
    prompt = row[column]
    messages = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                           for m in prompt)
    if not isinstance(prompt, str) and not messages:
        raise DataError(f"{where(row)}: column {column!r} must be text or chat messages "
                        f"[{{\"role\": ..., \"content\": ...}}], got {prompt!r:.100}")
    return prompt


def tokenize_prompts(rows: list[dict], config: DataConfig, tokenizer) -> list[list[int]]:
    """Prompt token ids, left-truncated to ``max_prompt_tokens`` (the end of a prompt matters most)."""
    prompts = []
    for row in rows:
        text = prompt_text(_prompt(row, config.prompt_column), tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(ids[-config.max_prompt_tokens:])
    return prompts


def _response_ids(row: dict, config: DataConfig, tokenizer) -> list[int]:
    """All the token ids of the row's response followed by EOS, refused unless the response is text."""
    response = row[config.response_column]
    if not isinstance(response, str):
        raise DataError(f"{where(row)}: column {config.response_column!r} must be text, got {response!r:.100}")
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_responses(rows: list[dict], config: DataConfig, tokenizer) -> list[list[int]]:
    """Response token ids followed by EOS, truncated to ``max_response_tokens``."""
    return [_response_ids(row, config, tokenizer)[:config.max_response_tokens] for row in rows]


def tokenize_responses_with_values(rows: list[dict], column: str, config: DataConfig,
                                   tokenizer) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`tokenize_responses` and, from the same tokenization, the per-token values in ``column``
    (e.g. ``osft score``'s behavior logprobs: one per response token, EOS included), cut alike. A row
    whose list does not fit its response under this tokenizer is refused, naming the row and column:
    it may lack only the tokens that ``max_response_tokens`` cuts off."""
    responses, out = [], []
    for row in rows:
        values = row[column]
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise DataError(f"{where(row)}: column {column!r} must be a list of numbers, got {values!r:.100}")
        ids = _response_ids(row, config, tokenizer)
        total, used = len(ids), min(len(ids), config.max_response_tokens)
        if not used <= len(values) <= total:
            expected = total if used == total else f"{used} to {total}"
            raise DataError(f"{where(row)}: {column} has {len(values)} values for a response of {total} tokens "
                            f"(EOS included) with this tokenizer, expected {expected}: score the data with this "
                            f"model's tokenizer (osft score)")
        responses.append(ids[:used])
        out.append(values[:used])
    return responses, out
