"""``pear``: offline SFT on the dataset's responses, each token's loss weighted by PEAR importance
weights of the current policy over the behavior policy that produced the data
(:func:`osft_kernels.losses.pear_loss`). The behavior logprobs come from ``osft score``. Logs
``pear/weight_mean``, the mean weight over the response tokens (below 1: the data is likelier under
the behavior policy than under the current one)."""
from torch import Tensor

from osft_kernels.losses import NORMALIZATIONS, count_items, pear_loss

from ..config import Config
from ..data import Sequences, pack, tokenize_prompts, tokenize_responses_with_values
from ..model import CausalLM


class PEARRecipe:
    updates_per_batch = 1
    columns = ("prompt_column", "response_column", "behavior_logprobs_column")
    generates = False

    def __init__(self, config: Config, lm: CausalLM):
        self.config, self.lm = config, lm

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict]:
        data, tokenizer = self.config.data, self.lm.tokenizer
        responses, behavior = tokenize_responses_with_values(rows, data.behavior_logprobs_column, data, tokenizer)
        batch = pack(tokenize_prompts(rows, data, tokenizer), responses, tokenizer.pad_token_id,
                     {"behavior_logprobs": behavior})
        return batch, {}

    def num_items(self, batch: Sequences) -> float:
        return count_items(batch.target_mask, NORMALIZATIONS[self.config.pear.normalize])

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict]:
        pear = self.config.pear
        loss, weights = pear_loss(**self.lm.fused_inputs(micro),
                                  logp_behavior=micro.token_values["behavior_logprobs"], level=pear.level,
                                  block_size=pear.block_size, gamma=pear.gamma,
                                  log_ratio_clip=(pear.log_ratio_clip_low, pear.log_ratio_clip_high),
                                  log_weight_clip=(pear.log_weight_clip_low, pear.log_weight_clip_high),
                                  normalize=pear.normalize, num_items=num_items, return_weights=True)
        # the weights are 0 outside the response tokens, whatever layout the fused inputs have
        return loss, {"pear/weight_mean": weights.sum() / max(micro.num_targets, 1)}
