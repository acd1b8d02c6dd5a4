"""Rollout engines: sample completions of tokenized prompts.

An engine returns, per completion, its token ids (ending with EOS unless truncated), the sampling
logprob of each token under the temperature-scaled distribution it was drawn from, and whether it
hit ``max_new_tokens`` before EOS.
"""
from dataclasses import dataclass

import torch

from .config import RolloutConfig
from .model import CausalLM


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool


class HFGenerateEngine:
    """Batched ``model.generate`` sampling (left-padded prompts), with ``top_p`` and ``max_new_tokens``."""

    def __init__(self, lm: CausalLM, config: RolloutConfig):
        self.lm, self.config = lm, config

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], temperature: float, num_samples: int = 1) -> list[Completion]:
        """``num_samples`` completions per prompt, grouped by prompt (prompt-major order)."""
        tokenizer, model = self.lm.tokenizer, self.lm.model
        requests = [p for p in prompts for _ in range(num_samples)]
        completions = []
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
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                 do_sample=True, temperature=temperature, top_p=self.config.top_p, top_k=0,
                                 max_new_tokens=self.config.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
            new_tokens = out.sequences[:, width:]
            # scores are the processed logits (after temperature and top-p) of each sampling step
            logprobs = torch.stack(out.scores, 1).float().log_softmax(-1).gather(2, new_tokens[..., None]).squeeze(2)
            for ids, lps in zip(new_tokens.tolist(), logprobs.tolist()):
                length = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
                completions.append(Completion(ids[:length], lps[:length],
                                              truncated=tokenizer.eos_token_id not in ids[:length]))
        model.train(was_training)
        return completions
