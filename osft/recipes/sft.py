"""``sft``: supervised fine-tuning on the dataset's responses (token-mean or sequence-mean NLL)."""
from torch import Tensor

from osft_kernels.losses import sft_loss

from ..config import Config
from ..data import Sequences, pack, tokenize_prompts, tokenize_responses
from ..model import CausalLM


def response_nll(lm: CausalLM, batch: Sequences, *, temperature: float, normalize: str, num_items: float,
                 backend: str) -> Tensor:
    """The (normalized) NLL of the response tokens of ``batch`` at ``temperature``, from the decoder's
    hidden states and the output head through the fused loss; ``num_items`` is the step's count."""
    head = lm.head()
    hidden = lm.hidden_states(batch.input_ids, batch.attention_mask)
    return sft_loss(hidden, head.weight, batch.labels, bias=head.bias, softcap=head.softcap, shift=True,
                    temperature=temperature * head.temperature_scale, normalize=normalize, num_items=num_items,
                    backend=backend)


class SFTRecipe:
    updates_per_batch = 1
    columns = ("prompt_column", "response_column")

    def __init__(self, config: Config, lm: CausalLM):
        self.config, self.lm = config, lm

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict]:
        tokenizer, data = self.lm.tokenizer, self.config.data
        batch = pack(tokenize_prompts(rows, data, tokenizer), tokenize_responses(rows, data, tokenizer),
                     tokenizer.pad_token_id)
        return batch, {}

    def num_items(self, batch: Sequences) -> float:
        return float(batch.num_sequences if self.config.sft.normalize == "sequences" else batch.num_targets)

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict]:
        return response_nll(self.lm, micro, temperature=1.0, normalize=self.config.sft.normalize,
                            num_items=num_items, backend=self.config.model.backend), {}
