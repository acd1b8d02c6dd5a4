"""osft.model: the head keywords of the fused ops for models that transform their logits, refused heads,
and gradient checkpointing."""

import pytest
import torch
from helpers.runs import base_overrides
from helpers.tiny_lm import arithmetic_rows
from torch import nn
from transformers import AutoModelForCausalLM

from osft.config import load_config
from osft.data import pack
from osft.model import load_causal_lm, output_head
from osft.recipes import make_recipe


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_fused_inputs_carry_the_models_logit_transform(family):
    """Every recipe and the scoring reach the fused ops through ``CausalLM.fused_inputs``: its logprobs
    equal the model's own logits (Granite's logits_scaling, Cohere's logit_scale, Gemma 2's final softcap)
    at a temperature, in float64."""
    import transformers

    from osft.model import CausalLM
    from osft_kernels import linear_logprobs

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model_class, config_class, transform = {
        "granite": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0}),
        "cohere": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 0.25}),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"final_logit_softcapping": 3.0})}[family]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**transform, **common))
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], pad_id=0)
    lm = CausalLM(model.eval(), tokenizer=None, backend="torch")
    ours = linear_logprobs(**lm.fused_inputs(batch, temperature=0.7)).logprobs
    with torch.no_grad():
        logits = model.double()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    expected = (logits / 0.7).log_softmax(-1).gather(-1, batch.labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = batch.target_mask
    torch.testing.assert_close(ours[mask].double(), expected[mask], rtol=1e-5, atol=1e-5)


def test_peft_like_head_is_refused(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    class AdapterLinear(nn.Linear):
        pass

    model.lm_head = AdapterLinear(32, model.config.vocab_size, bias=False)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        output_head(model)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, model_dir, data_file):
    gradients = []
    for checkpointing in ("false", "true"):
        config = load_config(None, [*base_overrides(model_dir, data_file, tmp_path, "sft"),
                                    f"model.gradient_checkpointing={checkpointing}"])
        lm = load_causal_lm(config.model, torch.device("cpu"))
        lm.model.train()
        recipe = make_recipe(config, lm)
        batch, _ = recipe.make_batch(arithmetic_rows()[:4], epoch=0.0)
        loss, _ = recipe.loss(batch, recipe.num_items(batch))
        loss.backward()
        gradients.append({name: p.grad.clone() for name, p in lm.model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == len(list(lm.model.parameters()))
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-5, atol=1e-7)


def test_attention_implementation_follows_the_device_and_flash_attn(monkeypatch):
    """``auto`` is flash-attn 2 only on a CUDA device with flash_attn installed, else sdpa; forcing
    flash-attn where it cannot run is a config error naming the key."""
    import importlib.util

    from osft.config import ConfigError
    from osft.model import attention_implementation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: (object() if installed else None) if name == "flash_attn"
                            else find_spec(name, *args))
        assert attention_implementation("auto", cpu) == "sdpa"
        assert attention_implementation("auto", cuda) == ("flash_attention_2" if installed else "sdpa")
        assert attention_implementation("eager", cuda) == "eager"
        with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs a CUDA device"):
            attention_implementation("flash_attention_2", cpu)
    with pytest.raises(ConfigError, match=r"needs the flash_attn package \(pip install '.\[gpu\]'\)"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
        attention_implementation("flash_attention_2", cuda)


@pytest.mark.parametrize("setting,expected", [("auto", "sdpa"), ("eager", "eager"), ("sdpa", "sdpa")])
def test_the_model_loads_with_the_chosen_attention(tmp_path, model_dir, data_file, setting, expected, capsys):
    from osft.train import train

    overrides = [*base_overrides(model_dir, data_file, tmp_path, "sft"), "max_steps=1",
                 f"model.attn_implementation={setting}"]
    config = load_config(None, overrides)
    lm = load_causal_lm(config.model, torch.device("cpu"))
    assert lm.attention == lm.model.config._attn_implementation == expected
    train(config, progress=True)
    assert f"attention {expected}, fused loss backend" in capsys.readouterr().out
