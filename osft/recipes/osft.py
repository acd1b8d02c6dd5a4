"""``osft``: online SFT. Each step samples one response per prompt at ``tau_s`` (annealed by
:func:`osft_kernels.losses.sampling_temperature`) and trains on it at ``tau_t``; no reward, no
reference model. With ``rollout.mask_truncated_completions``, responses cut at ``max_new_tokens`` are
not trained on."""
from torch import Tensor

from osft_kernels.losses import count_items, sampling_temperature, sft_loss

from ..config import Config
from ..data import Sequences, pack, tokenize_prompts
from ..model import CausalLM
from ..rollout import RolloutEngine, completion_metrics


class OSFTRecipe:
    updates_per_batch = 1
    columns = ("prompt_column",)
    generates = True

    def __init__(self, config: Config, lm: CausalLM, engine: RolloutEngine):
        self.config, self.lm, self.engine = config, lm, engine

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict]:
        osft = self.config.osft
        tau_s = sampling_temperature(epoch, start=osft.tau_s_start, end=osft.tau_s_end,
                                     anneal_epochs=osft.anneal_epochs)
        prompts = tokenize_prompts(rows, self.config.data, self.lm.tokenizer)
        completions = self.engine.generate(prompts, temperature=tau_s)
        batch = pack(prompts, [c.token_ids for c in completions], self.lm.tokenizer.pad_token_id)
        if self.config.rollout.mask_truncated_completions:
            batch.drop_targets([c.truncated for c in completions])
        return batch, {"tau_s": tau_s, **completion_metrics(completions)}

    def num_items(self, batch: Sequences) -> float:
        return count_items(batch.target_mask, "token-mean")

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict]:
        return sft_loss(**self.lm.fused_inputs(micro, self.config.osft.tau_t), normalize="tokens",
                        num_items=num_items), {}
