"""Training data from local files, the prompt formatting, and the tokenized batches the recipes train on."""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import DataConfig

IGNORE = -100


def load_rows(path: str, required: list[str]) -> list[dict]:
    """The rows of a local ``.jsonl`` / ``.json`` / ``.parquet`` file (read with HF ``datasets``)."""
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(path).suffix)
    if kind is None:
        raise ValueError(f"data file {path} must end in .jsonl, .json or .parquet")
    if not Path(path).is_file():
        raise ValueError(f"data file {path} does not exist")
    table = datasets.load_dataset(kind, data_files=str(path), split="train")
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise ValueError(f"data file {path} has no column {missing[0]!r} (columns: {table.column_names})")
    if len(table) == 0:
        raise ValueError(f"data file {path} has no rows")
    return table.to_list()


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

    ``token_values``: per-token float tensors ``[B, T]`` aligned with ``labels`` (e.g. sampling
    logprobs of the response tokens); ``row_values``: per-sequence tensors ``[B]`` (e.g. advantages).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_values: dict[str, Tensor] = field(default_factory=dict)
    row_values: dict[str, Tensor] = field(default_factory=dict)

    @property
    def target_mask(self) -> Tensor:
        """Bool ``[B, T - 1]``: which shifted targets ``labels[:, 1:]`` carry loss."""
        return self.labels[:, 1:] != IGNORE

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())

    @property
    def num_sequences(self) -> int:
        """Sequences with at least one target."""
        return int(self.target_mask.any(1).sum())

    def _map(self, rows=slice(None), width=None, device=None) -> "Sequences":
        def tokens(x: Tensor) -> Tensor:
            return x[rows, :width].to(device) if device else x[rows, :width]

        def per_row(x: Tensor) -> Tensor:
            return x[rows].to(device) if device else x[rows]

        return Sequences(tokens(self.input_ids), tokens(self.attention_mask), tokens(self.labels),
                         {k: tokens(v) for k, v in self.token_values.items()},
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

    def shifted(self, name: str) -> Tensor:
        """A token value aligned with the shifted targets ``labels[:, 1:]``."""
        return self.token_values[name][:, 1:]


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         response_values: dict[str, list[list[float]]] | None = None) -> Sequences:
    """Right-padded sequences of ``prompt + response`` with labels on the response tokens;
    ``response_values`` (one value per response token) become ``token_values`` at those positions."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE, dtype=torch.long)
    values = {name: torch.zeros(len(prompts), length) for name in response_values or {}}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt + response
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, len(prompt):len(ids)] = torch.tensor(response, dtype=torch.long)
        for name, per_response in (response_values or {}).items():
            values[name][i, len(prompt):len(ids)] = torch.tensor(per_response[i], dtype=torch.float32)
    return Sequences(input_ids, attention_mask, labels, values)


def micro_batches(sequences: Sequences, token_budget: int) -> list[Sequences]:
    """Consecutive groups of rows whose padded size ``rows * max length`` fits ``token_budget``
    (a single row always forms a group)."""
    lengths = sequences.attention_mask.sum(1).tolist()
    groups, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * max(lengths[start:end + 1]) <= token_budget:
            end += 1
        groups.append(sequences.select(slice(start, end)).truncate(max(lengths[start:end])))
        start = end
    return groups


def tokenize_prompts(rows: list[dict], config: DataConfig, tokenizer) -> list[list[int]]:
    """Prompt token ids, left-truncated to ``max_prompt_tokens`` (the end of a prompt matters most)."""
    prompts = []
    for row in rows:
        ids = tokenizer(prompt_text(row[config.prompt_column], tokenizer), add_special_tokens=False)["input_ids"]
        prompts.append(ids[-config.max_prompt_tokens:])
    return prompts


def tokenize_responses(rows: list[dict], config: DataConfig, tokenizer) -> list[list[int]]:
    """Response token ids followed by EOS, truncated to ``max_response_tokens``."""
    responses = []
    for row in rows:
        ids = tokenizer(row[config.response_column], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        responses.append(ids[:config.max_response_tokens])
    return responses
