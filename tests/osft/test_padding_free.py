"""``model.padding_free``: the decoder runs a micro-batch's sequences back to back with restarting
``position_ids`` (transformers builds block-causal masks from them for sdpa and eager when there is no
attention mask and no cache), in rows as long as the longest sequence or (flash-attn) in one row, and
everything downstream is unchanged: the same hidden states, the same losses and gradients for every
recipe and aggregation, the same training run."""
import pytest
import torch
import transformers
from helpers.runs import base_overrides, read_metrics
from helpers.tiny_lm import arithmetic_rows

from osft.config import load_config
from osft.data import micro_batches, pack
from osft.model import CausalLM, load_causal_lm, pack_rows, packed_hidden_states
from osft.recipes import make_recipe
from osft.train import train

# right-padded rows of 5, 1, 9 and 3 tokens: a one-token sequence, and one longer than the sliding window
LENGTHS = [5, 1, 9, 3]


def _decoder(family: str, attention: str):
    common = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=32, attn_implementation=attention)
    torch.manual_seed(0)
    if family == "gemma3":  # local layers attend to the last 4 positions
        config = transformers.Gemma3TextConfig(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                               **common)
        return transformers.Gemma3ForCausalLM(config).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def test_sequences_are_packed_first_fit_in_decreasing_length():
    assert pack_rows(LENGTHS, 9) == [[2], [0, 3, 1]]
    assert pack_rows([4, 4, 4, 2], 6) == [[0, 3], [1], [2]]
    assert pack_rows(LENGTHS, sum(LENGTHS)) == [[2, 0, 3, 1]]


@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_hidden_states_equal_the_padded_ones(family, attention, one_row):
    model = _decoder(family, attention)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 61, (len(LENGTHS), max(LENGTHS)), generator=gen)
    attention_mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]).long()
    with torch.no_grad():
        padded = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        packed = packed_hidden_states(CausalLM(model, tokenizer=None).decode, input_ids, attention_mask,
                                      one_row=one_row)
    present = attention_mask.bool()
    # float32 (a wrong mask is off by ~1; Gemma 3's padded eager attention gives NaN in float64)
    torch.testing.assert_close(packed[present], padded[present], rtol=1e-5, atol=1e-5)
    assert not packed[~present].any(), "padding holds zeros"


def test_padding_free_micro_batches_count_tokens_not_padding():
    batch = pack([[1] * (n - 1) for n in LENGTHS], [[2]] * len(LENGTHS), pad_id=0)
    # padded sizes: 2 x 5, then 2 x 9 > 12; tokens: 5 + 1, then 9 + 3
    assert [m.input_ids.shape[0] for m in micro_batches(batch, 12)] == [2, 1, 1]
    assert [m.input_ids.shape[0] for m in micro_batches(batch, 12, padding_free=True)] == [2, 2]


def _batch(recipe_name: str, recipe, lm: CausalLM):
    """Four rows of the recipe's batch; GRPO's completions are the data's responses with made-up engine
    logprobs and advantages (no sampling: both layouts train on the same tokens)."""
    rows = arithmetic_rows()[:4]
    tokenizer, data = lm.tokenizer, recipe.config.data
    responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in rows]
    gen = torch.Generator().manual_seed(2)
    values = [(-torch.rand(len(r), generator=gen)).tolist() for r in responses]
    if recipe_name == "pear":
        return recipe.make_batch([{**r, "behavior_logprobs": v} for r, v in zip(rows, values)], epoch=0.0)[0]
    if recipe_name == "sft":
        return recipe.make_batch(rows, epoch=0.0)[0]
    from osft.data import tokenize_prompts
    batch = pack(tokenize_prompts(rows, data, tokenizer), responses, tokenizer.pad_token_id,
                 {"engine_logprobs": values})
    batch.row_values["advantages"] = torch.randn(4, generator=gen)
    return batch


RECIPE_SETTINGS = {
    "sft": ["sft.normalize=sequences"],
    "pear": ["pear.level=sequence", "pear.normalize=sequences"],
    "grpo": ["grpo.agg=seq-mean-token-mean", "grpo.is_cap=2.0", "grpo.is_level=sequence", "grpo.entropy_coef=0.01",
             "grpo.num_generations=2"],
}


@pytest.mark.parametrize("recipe_name", list(RECIPE_SETTINGS))
def test_padding_free_gives_the_padded_losses_and_gradients(tmp_path, model_dir, data_file, recipe_name):
    """Sequence-level aggregations, PEAR's sequence weights and sequence-level importance weights all reduce
    along the padded rows, which the packed hidden states are put back on."""
    results = []
    for padding_free in (False, True):
        config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, recipe_name),
                                    *RECIPE_SETTINGS[recipe_name], f"model.padding_free={padding_free}"])
        lm = load_causal_lm(config.model, torch.device("cpu"))
        assert lm.padding_free is padding_free
        lm.model.train()
        recipe = make_recipe(config, lm)
        batch = _batch(recipe_name, recipe, lm)
        total = 0.0
        for micro in micro_batches(batch, 40, padding_free=padding_free):
            loss, _ = recipe.loss(micro, recipe.num_items(batch))
            loss.backward()
            total += loss.item()
        results.append((total, {name: p.grad.clone() for name, p in lm.model.named_parameters()}))
    (padded_loss, padded), (packed_loss, packed) = results
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_padding_free_run_follows_the_padded_one(tmp_path, model_dir, data_file):
    curves = []
    for padding_free in (False, True):
        run_dir = tmp_path / str(padding_free)
        train(load_config(None, [*base_overrides(model_dir, data_file, run_dir, "sft"), "max_steps=3",
                                 f"model.padding_free={padding_free}"]), progress=False)
        curves.append([(m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)])
    assert len(curves[0]) == 3
    for padded, packed in zip(*curves):
        assert packed == pytest.approx(padded, rel=1e-4)
