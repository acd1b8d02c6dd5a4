"""osft.rollout's hf engine: its sampler draws from the stated distribution (against float64 references),
greedy decoding is the argmax path, prompts at mixed temperatures share a generation, bfloat16
generation records the logprobs it sampled from, and a missing vLLM is reported."""
import copy

import pytest
import torch
from helpers.runs import base_overrides

from osft.config import load_config
from osft.model import load_causal_lm
from osft.recipes import make_recipe


def test_vllm_engine_absence_is_reported(tmp_path, model_dir, data_file, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path), "rollout.engine=vllm"])
    lm = load_causal_lm(config.model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"rollout.engine=vllm needs vLLM: pip install '.\[vllm\]'"):
        make_recipe(config, lm)


def test_greedy_generation_is_the_argmax_path(model_dir):
    from osft.config import Config, ModelConfig, RolloutConfig
    from osft.rollout import HFGenerateEngine

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6]]
    engine = HFGenerateEngine(lm, Config(rollout=RolloutConfig(max_new_tokens=6, batch_size=2, autocast="off")))
    torch.manual_seed(1)
    first = engine.generate(prompts, temperature=0.0)
    torch.manual_seed(2)
    assert [c.token_ids for c in engine.generate(prompts, temperature=0.0)] == [c.token_ids for c in first]
    for prompt, completion in zip(prompts, first):  # each token is the argmax given the prefix
        ids = list(prompt)
        for token, logprob in zip(completion.token_ids, completion.logprobs):
            with torch.no_grad():
                logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
            assert token == int(logits.argmax())
            assert logprob == pytest.approx(float(logits.log_softmax(-1)[token]), abs=1e-4)
            ids.append(token)


def test_bfloat16_generation_records_the_logprobs_it_sampled_from(model_dir):
    """Under rollout.autocast=bfloat16 the float32 model samples through bfloat16 products, and each
    recorded logprob is that of the bfloat16 distribution, not the float32 one; ``auto`` picks it only
    for float32 weights on hardware that multiplies bfloat16 natively.

    The bfloat16 reference is teacher-forced one token at a time through a KV cache, as generation
    runs: a single full-sequence pass multiplies other shapes, and where bfloat16 is emulated (AVX2)
    its logits round differently by up to ~6e-3 in a logprob."""
    from transformers import DynamicCache

    from osft.config import Config, ModelConfig, RolloutConfig
    from osft.model import native_bfloat16
    from osft.rollout import HFGenerateEngine, generation_autocast

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    assert generation_autocast(lm.model, "off") is None
    assert generation_autocast(lm.model, "auto") == (torch.bfloat16 if native_bfloat16(lm.device) else None)
    assert generation_autocast(copy.deepcopy(lm.model).bfloat16(), "bfloat16") is None  # already bfloat16
    with torch.no_grad():  # a sharper distribution than the tiny model's, so that bfloat16 shows
        lm.model.lm_head.weight.mul_(6.0)
    engine = HFGenerateEngine(lm, Config(rollout=RolloutConfig(max_new_tokens=8, batch_size=3, autocast="bfloat16")))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6], [7, 8, 9, 10]]
    torch.manual_seed(0)
    completions = engine.generate(prompts, temperature=1.0)
    gaps_to_float32 = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([list(prompt) + completion.token_ids])
        targets = ids[0, len(prompt):]
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cache = DynamicCache(config=lm.model.config)
                steps = [lm.model(ids[:, :len(prompt)], cache=cache, use_cache=True).logits[0, -1]]
                steps += [lm.model(ids[:, k:k + 1], cache=cache, use_cache=True).logits[0, -1]
                          for k in range(len(prompt), ids.shape[1] - 1)]
                half = torch.stack(steps).float().log_softmax(-1)
            full = lm.model(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        recorded = torch.tensor(completion.logprobs, dtype=torch.float64)
        torch.testing.assert_close(recorded, half.gather(1, targets[:, None])[:, 0].double(), rtol=0, atol=1e-3)
        gaps_to_float32.append((recorded - full.gather(1, targets[:, None])[:, 0]).abs().max())
    assert max(gaps_to_float32) > 2e-3  # bfloat16 products did run (the float32 logprobs are further off)


def _reference_token(probs: torch.Tensor, draw: float) -> int:
    """The inverse of the float64 cumulative distribution of one row at ``draw`` times its sum."""
    through = probs.double().cumsum(0)
    return int(torch.searchsorted(through, torch.tensor([draw * float(through[-1])], dtype=torch.float64),
                                  right=True)[0])


@pytest.mark.parametrize("vocab, block", [(37, 8), (64, 16), (5, 1024)])
def test_inverse_cdf_picks_the_float64_reference_token(vocab, block):
    """Against a float64 running sum over the whole row, on rows with zero-probability tokens (never
    chosen), draws at both ends of [0, 1), and a vocabulary that is or is not a multiple of the block."""
    from osft.rollout import inverse_cdf

    generator = torch.Generator().manual_seed(vocab)
    probs = torch.rand(300, vocab, generator=generator) ** 4
    probs[torch.rand(300, vocab, generator=generator) < 0.3] = 0.0
    probs[:, 0] = torch.where(probs.sum(1) == 0, 1.0, probs[:, 0])
    probs[:2, :2], probs[:2, 2], probs[1, -2:] = 0.0, 0.5, 0.0  # rows 0 and 1 start (and 1 ends) with zeros
    draws = torch.rand(300, generator=generator, dtype=torch.float64)
    draws[:3] = torch.tensor([0.0, 1 - 2**-53, 0.5])
    tokens = inverse_cdf(probs, draws, block=block)
    assert tokens.dtype == torch.int64 and (probs.gather(1, tokens[:, None]) > 0).all()
    for row, draw, token in zip(probs, draws.tolist(), tokens.tolist()):
        boundaries = row.double().cumsum(0) / row.double().sum()
        if (boundaries - draw).abs().min() > 1e-9:  # not within rounding of an interval's edge
            assert token == _reference_token(row, draw)
    positive = [torch.nonzero(row)[:, 0] for row in probs[:2]]
    assert tokens[0] == positive[0][0] and tokens[1] == positive[1][-1]


def _float64_policy(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log softmax(logits / temperature) restricted to the top_p nucleus and renormalized, in float64."""
    logprobs = (logits.double() / temperature).log_softmax(-1)
    ordered, order = logprobs.sort(-1, descending=True)
    outside = (ordered.exp().cumsum(-1) - ordered.exp()) >= top_p
    return logprobs.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf")).log_softmax(-1)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_token_sampler_draws_from_the_tempered_nucleus(top_p):
    """Rows at temperatures 0, 0.5 and 1.3: greedy rows take the argmax with its unscaled logprob; the
    others sample softmax(logits / t) within the top_p nucleus, each drawn token's recorded logprob is
    the float64 one, and the counts over 40000 draws of one row follow it (5 standard deviations)."""
    from osft.rollout import TokenSampler

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 2
    rows = 40000
    temperatures = torch.tensor([0.0, 0.5, 1.3]).repeat_interleave(rows)
    sampler = TokenSampler(temperatures, top_p)
    torch.manual_seed(0)
    tokens, recorded = sampler(logits.repeat_interleave(rows, 0), torch.arange(3 * rows))
    assert tokens.dtype == torch.int64 and recorded.dtype == torch.float32
    recorded = recorded.double()
    greedy = _float64_policy(logits[0], 1.0, 1.0)
    assert (tokens[:rows] == logits[0].argmax()).all()
    torch.testing.assert_close(recorded[:rows], greedy[logits[0].argmax()].expand(rows), rtol=0, atol=1e-6)
    for i, temperature in ((1, 0.5), (2, 1.3)):
        policy = _float64_policy(logits[i], temperature, top_p)
        drawn, logprobs = tokens[i * rows:(i + 1) * rows], recorded[i * rows:(i + 1) * rows]
        assert torch.isfinite(policy[drawn]).all()  # never outside the nucleus
        torch.testing.assert_close(logprobs, policy[drawn], rtol=0, atol=1e-5)
        expected = policy.exp() * rows
        counts = torch.bincount(drawn, minlength=50).double()
        assert ((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt() + 1).all()


def test_mixed_temperatures_share_a_generation(model_dir):
    """Greedy prompts beside sampled ones in one batch decode exactly as greedy prompts alone, and each
    sampled token's recorded logprob is that of a teacher-forced float64 rescoring at its temperature
    within rollout.top_p."""
    from osft.config import Config, ModelConfig, RolloutConfig
    from osft.rollout import HFGenerateEngine

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6], [7, 8, 9]]
    engine = HFGenerateEngine(lm, Config(rollout=RolloutConfig(max_new_tokens=6, batch_size=8, top_p=0.9,
                                                               autocast="off")))
    with pytest.raises(ValueError, match=r"temperature: expected a number or one per prompt \(3\), got 2"):
        engine.generate(prompts, temperature=[1.0, 0.0])
    torch.manual_seed(0)
    mixed = engine.generate(prompts, temperature=[0.0, 0.7, 1.0], num_samples=2)
    alone = engine.generate(prompts[:1], temperature=0.0)
    assert mixed[0].token_ids == mixed[1].token_ids == alone[0].token_ids
    for index, (prompt, temperature) in enumerate([(prompts[1], 0.7), (prompts[1], 0.7), (prompts[2], 1.0)]):
        completion = mixed[2 + index]
        ids = torch.tensor([list(prompt) + completion.token_ids])
        with torch.no_grad():
            logits = lm.model(ids).logits[0, len(prompt) - 1:-1]
        policy = _float64_policy(logits, temperature, 0.9)
        expected = policy.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs, dtype=torch.float64), expected, rtol=0,
                                   atol=1e-4)


def test_decoding_runs_each_prompt_once_and_drops_finished_rows(model_dir):
    """decode runs each distinct prompt once for all its rows, and drops rows (and their cache rows) once
    they emit EOS. With an EOS token that some rows emit early, each row stops at its first EOS, and up
    to there every row generates exactly the tokens and logprobs it generates when no row ever stops
    (its draws and its cache are its own), and the same as with a prompt per row. Left-padded prompts of
    different lengths, greedy and sampled rows, two rows per prompt."""
    from osft.config import ModelConfig
    from osft.rollout import TokenSampler, decode

    lm = load_causal_lm(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    prompts = [lm.tokenizer("<user> what is 3 plus 4 ? <assistant>")["input_ids"], [5, 6], [7, 8, 9], [9, 10, 11, 5]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    prompt_of_row = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    temperatures = torch.tensor([0.0, 1.0, 1.0, 0.7, 1.0, 0.0, 0.7, 1.0])

    def run(eos: int, once: bool = True, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        if once:
            return decode(lm.model, input_ids, attention_mask, prompt_of_row, TokenSampler(temperatures, 1.0), steps,
                          eos)
        return decode(lm.model, input_ids[prompt_of_row], attention_mask[prompt_of_row], torch.arange(8),
                      TokenSampler(temperatures, 1.0), steps, eos)

    tokens, logprobs = run(eos=-1)  # no row ever stops
    assert (logprobs < 0).all()
    each, each_logprobs = run(eos=-1, once=False)
    assert each.tolist() == tokens.tolist()
    torch.testing.assert_close(each_logprobs, logprobs, rtol=0, atol=1e-5)
    # an EOS that ends the first greedy row early while at least one other row never emits it
    eos = next(int(t) for t in tokens[0, :4] if (tokens[1:] != t).all(1).any())
    stopped, stopped_logprobs = run(eos)
    ends = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else row.numel() for row in tokens]
    assert ends[0] <= 4 and max(ends) == tokens.shape[1]
    for row, end in enumerate(ends):
        assert stopped[row, :end].tolist() == tokens[row, :end].tolist()
        assert (stopped[row, end:] == eos).all() and (stopped_logprobs[row, end:] == 0).all()
        torch.testing.assert_close(stopped_logprobs[row, :end], logprobs[row, :end], rtol=0, atol=1e-5)
        # against a teacher-forced pass over the row's own prompt and tokens, without a cache
        prompt, temperature = prompts[prompt_of_row[row]], float(temperatures[row])
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + stopped[row, :end].tolist()])).logits[0, len(prompt) - 1:-1]
        policy = _float64_policy(logits, temperature or 1.0, 1.0)
        if temperature == 0:
            assert stopped[row, :end].tolist() == logits.argmax(-1).tolist()
        expected = policy.gather(1, stopped[row, :end, None])[:, 0]
        torch.testing.assert_close(stopped_logprobs[row, :end].double(), expected, rtol=0, atol=1e-4)
