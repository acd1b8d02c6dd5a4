"""Per-token logprobs of given token sequences under a model, through the fused op (no logits), and
``osft score``, which writes them into a data file."""
from pathlib import Path

import torch
from torch import Tensor

from osft_kernels import linear_logprobs

from .config import Config
from .data import Sequences, load_rows, pack, tokenize_prompts, tokenize_responses
from .distributed import join_ranks
from .model import CausalLM, default_device, load_causal_lm


@torch.no_grad()
def target_logprobs(lm: CausalLM, batch: Sequences, *, temperature: float) -> Tensor:
    """``log p(labels[:, t + 1])`` at ``temperature``, ``[B, T - 1]`` float32, 0 at non-target positions."""
    return linear_logprobs(**lm.fused_inputs(batch, temperature)).logprobs


def score_file(config: Config, output: Path, *, temperature: float = 1.0) -> Path:
    """Write ``config.data.train`` with a ``config.data.behavior_logprobs_column`` column: the logprob
    of each response token (EOS included, as the ``sft``/``pear`` recipes tokenize it) under
    ``config.model`` at ``temperature``. This is how PEAR's behavior-policy logprobs are collected.
    Under torchrun the processes score shares of the rows and the main rank writes the file."""
    import datasets

    data = config.data
    rows = load_rows(data.train, [data.prompt_column, data.response_column])
    with join_ranks() as ranks:  # under torchrun each process scores a share of the rows
        device = default_device()
        lm = load_causal_lm(config.model, device)
        lm.model.eval()
        mine, scored = ranks.share(rows), []
        for start in range(0, len(mine), config.rollout.batch_size):
            chunk = mine[start:start + config.rollout.batch_size]
            batch = pack(tokenize_prompts(chunk, data, lm.tokenizer), tokenize_responses(chunk, data, lm.tokenizer),
                         lm.tokenizer.pad_token_id)
            logprobs = target_logprobs(lm, batch.to(device), temperature=temperature).cpu()
            for row, values, mask in zip(chunk, logprobs, batch.target_mask):
                scored.append({**row, data.behavior_logprobs_column: values[mask].tolist()})
        scored = ranks.concatenated(scored)
    if ranks.main:
        output.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(scored).to_parquet(str(output))
    return output
