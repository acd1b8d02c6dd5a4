"""The fused ops inside real ``transformers`` causal LMs (built from configs, no downloads): the loss
and every parameter gradient match the model's own logits-based loss."""
import re

import pytest
import torch
from helpers.paths import ROOT

transformers = pytest.importorskip("transformers")

from osft_kernels import linear_cross_entropy, linear_logprobs

VOCAB = 1000


def tiny(name: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if name == "llama-tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(final_logit_softcapping=5.0, **common))


def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :7] = -100
    labels[2, 15:] = -100
    return input_ids, labels


def softcap_of(model):
    return getattr(model.config, "final_logit_softcapping", None)


@pytest.mark.parametrize("name", ["llama-tied", "gemma2-softcap"])
def test_fused_loss_matches_model_loss_and_gradients(name):
    model = tiny(name)
    input_ids, labels = batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    expected_loss = model(input_ids=input_ids, labels=labels).loss.detach()
    model.zero_grad(set_to_none=True)

    hidden = model.model(input_ids=input_ids).last_hidden_state
    loss = linear_cross_entropy(hidden, model.lm_head.weight, labels, softcap=softcap_of(model), shift=True)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for key, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["llama-tied", "gemma2-softcap"])
def test_logprobs_match_model_logits_with_temperature(name):
    model = tiny(name)
    input_ids, labels = batch()
    temperature = torch.tensor([[0.6], [1.0], [1.3]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float() / temperature[..., None]
        logp = torch.log_softmax(logits, -1)
        targets = labels[:, 1:]
        expected = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
        expected_entropy = -(logp.exp() * logp).sum(-1) * (targets != -100)
        hidden = model.model(input_ids=input_ids).last_hidden_state
        out = linear_logprobs(hidden, model.lm_head.weight, labels, temperature=temperature,
                              softcap=softcap_of(model), shift=True, return_entropy=True)
    torch.testing.assert_close(out.logprobs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, expected_entropy, rtol=1e-5, atol=1e-5)


def test_readme_training_step_runs():
    """The README's example is executed as written."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].item() > 0
