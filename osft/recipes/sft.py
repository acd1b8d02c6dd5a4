"""``sft``: supervised fine-tuning on the dataset's responses (token-mean or sequence-mean NLL)."""
from torch import Tensor

from osft_kernels.losses import NORMALIZATIONS, count_items, sft_loss

from ..config import Config
from ..data import Sequences, pack, tokenize_prompts, tokenize_responses
from ..model import CausalLM


class SFTRecipe:
    updates_per_batch = 1
    columns = ("prompt_column", "response_column")
    generates = False

    def __init__(self, config: Config, lm: CausalLM):
        self.config, self.lm = config, lm

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict]:
        tokenizer, data = self.lm.tokenizer, self.config.data
        batch = pack(tokenize_prompts(rows, data, tokenizer), tokenize_responses(rows, data, tokenizer),
                     tokenizer.pad_token_id)
        return batch, {}

    def num_items(self, batch: Sequences) -> float:
        return count_items(batch.target_mask, NORMALIZATIONS[self.config.sft.normalize])

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict]:
        return sft_loss(**self.lm.fused_inputs(micro), normalize=self.config.sft.normalize, num_items=num_items), {}
