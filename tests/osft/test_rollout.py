"""osft.rollout's hf engine: greedy decoding is the argmax path, bfloat16 generation records the
logprobs it sampled from, and a missing vLLM is reported."""
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
