"""``osft_kernels.integrations.transformers.patch`` on a tiny model of every type in its table (built
from configs, nothing downloaded): the fused loss and every parameter gradient equal the unpatched
model's, calls without labels are the original forward bitwise, ``unpatch`` restores it, and the
logprobs request matches a float64 reference from the model's own logits."""
import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

transformers = pytest.importorskip("transformers")

from osft_kernels.integrations.transformers import CAUSAL_LM_CLASSES, causal_lm_class, patch, unpatch

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
# per type: what its head or decoder does beyond Llama's, at values where leaving it out fails the tests
CONFIGS = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": {},
    "mixtral": dict(num_local_experts=4, **MOE),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, **MOE),
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=64, **MOE),
    "gemma": {},
    "gemma2": dict(final_logit_softcapping=0.5),
    "gemma3_text": dict(final_logit_softcapping=0.5),
    "gemma3": None,  # multimodal config, built in config_of
    "phi3": {},
    "olmo2": {},
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=4.0),
    "smollm3": {},
}
TYPES = sorted(CONFIGS)


def config_of(model_type: str):
    if model_type == "gemma3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        # the text softcap is set but Gemma3ForConditionalGeneration's forward (transformers 5.24) does not apply it
        text = dict(COMMON, final_logit_softcapping=0.5)
        return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         image_token_id=VOCAB - 1, boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 3)
    return transformers.AutoConfig.for_model(model_type, **COMMON, **CONFIGS[model_type])


@functools.cache
def _built(model_type: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config_of(model_type)).to(dtype).train()


def tiny(model_type: str, dtype=torch.float32):
    """A fresh copy of the type's tiny model (vocabulary 1000, hidden 64, 2 layers), in training mode."""
    return copy.deepcopy(_built(model_type, dtype))


def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB - 3, (3, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :7] = -100
    labels[2, 15:] = -100
    return input_ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_to_max(actual, expected, rtol, atol, msg=""):
    """Elementwise ``|a - e| <= atol * max|e| + rtol * |e|``."""
    bound = atol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=bound, msg=msg)


# (loss rtol, gradient rtol, gradient atol relative to the largest entry). In bf16 the unpatched model
# rounds its logits to bf16 and the fused op does not: measured loss within 3e-5 relative and
# gradients within 1.7e-2 of their largest entry (gemma3_text); a missing num_items_in_batch,
# softcap, logit scale or router loss fails in both dtypes.
TOLERANCE = {torch.float32: (1e-5, 1e-5, 1e-6), torch.bfloat16: (1e-3, 2e-2, 2e-2)}


@pytest.mark.parametrize("keep", [5, "positions", "mask"])
def test_logits_to_keep_limits_the_loss_to_the_kept_positions(keep):
    """As the model's own forward: the loss reads only the kept positions, with labels of their length."""
    model = tiny("llama")
    input_ids, labels = batch()
    if keep == 5:
        kept_labels = labels[:, -5:]
    elif keep == "positions":
        keep = torch.tensor([[3, 8, 9, 20]] * 3)
        kept_labels = labels.gather(1, keep)
    else:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, 10:16] = True
        kept_labels = labels[keep]
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=kept_labels, logits_to_keep=keep)
    patch(model)
    ours, grads = loss_and_grads(model, input_ids=input_ids, labels=kept_labels, logits_to_keep=keep)
    assert ours.logits is None
    assert_close_to_max(ours.loss, expected.loss, 1e-5, 1e-6)
    for name, grad in expected_grads.items():
        assert_close_to_max(grads[name], grad, 1e-5, 1e-6, msg=name)


@pytest.mark.parametrize("items", ["mean", "num_items"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", TYPES)
def test_loss_and_gradients_equal_the_unpatched_model(model_type, dtype, items):
    model = tiny(model_type, dtype)
    assert type(model).__name__ == CAUSAL_LM_CLASSES[model_type]
    input_ids, labels = batch()
    inputs = dict(input_ids=input_ids, labels=labels)
    if items == "num_items":  # a count that is not the batch's own, as under gradient accumulation
        inputs["num_items_in_batch"] = (labels[:, 1:] != -100).sum() + 11
    expected, expected_grads = loss_and_grads(model, **inputs)
    patch(model)
    out, grads = loss_and_grads(model, **inputs)

    loss_rtol, rtol, atol = TOLERANCE[dtype]
    assert out.logits is None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected.loss.float(), rtol=loss_rtol, atol=0)
    if getattr(model.config, "output_router_logits", False):
        assert expected.aux_loss is not None and torch.equal(out.aux_loss, expected.aux_loss)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close_to_max(grad.float(), expected_grads[name].float(), rtol, atol, msg=name)


@pytest.mark.parametrize("model_type", TYPES)
def test_calls_without_labels_are_the_original_forward_and_unpatch_restores_it(model_type):
    model = tiny(model_type)
    input_ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        last = model(input_ids=input_ids, logits_to_keep=1).logits
        eval_out = model.eval()(input_ids=input_ids, labels=labels)
        model.train()
        patch(model)
        assert torch.equal(model(input_ids=input_ids).logits, logits)
        assert torch.equal(model(input_ids, logits_to_keep=1).logits, last)
        patched_eval = model.eval()(input_ids=input_ids, labels=labels)  # eval with labels: the original forward
        assert torch.equal(patched_eval.logits, eval_out.logits) and torch.equal(patched_eval.loss, eval_out.loss)
        model.train()
        assert model(input_ids=input_ids, labels=labels).logits is None
        unpatch(model)
        assert "forward" not in model.__dict__
        restored = model(input_ids=input_ids, labels=labels)
    assert torch.equal(restored.logits, logits)


def float64_reference(model, input_ids, targets, temperature):
    """``log_softmax(logits / T)`` of the model's own logits in float64: logprobs and entropy of the
    shifted targets (0 at ignored ones), differentiable (through the model's forward)."""
    logits = model(input_ids=input_ids).logits[:, :-1].double() / temperature.double()[:, None, None]
    logp = torch.log_softmax(logits, -1)
    shifted = targets[:, 1:]
    valid = shifted != -100
    logprobs = logp.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * valid
    entropy = -(logp.exp() * logp).sum(-1) * valid
    return logprobs, entropy


@pytest.mark.parametrize("model_type", TYPES)
def test_token_logprobs_and_entropy_match_float64_logits(model_type):
    model = tiny(model_type).eval()
    reference = copy.deepcopy(model)
    input_ids, labels = batch()
    temperature = torch.tensor([0.7, 1.0, 1.6])
    expected_logprobs, expected_entropy = float64_reference(reference, input_ids, labels, temperature)
    patch(model)
    out = model(input_ids=input_ids, return_token_logprobs=True, targets=labels, temperature=temperature)
    assert out.logits is None and out.loss is None
    assert out.log_probs.dtype == out.entropy.dtype == torch.float32
    torch.testing.assert_close(out.log_probs.double(), expected_logprobs.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), expected_entropy.detach(), rtol=1e-5, atol=1e-5)

    # differentiable (the verl contract): gradients of a weighted sum of both outputs
    weights = torch.linspace(-1, 1, labels[:, 1:].numel()).view(3, -1)
    (weights * out.log_probs + weights.flip(-1) * out.entropy).sum().backward()
    (weights * expected_logprobs + weights.flip(-1) * expected_entropy).sum().backward()
    expected_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert_close_to_max(param.grad, expected_grads[name].grad, 1e-4, 1e-5, msg=name)


def test_logprob_request_defaults_to_input_ids_and_takes_shifted_targets():
    model = tiny("gemma2").eval()
    patch(model)
    input_ids, _ = batch()
    with torch.no_grad():
        default = model(input_ids, return_token_logprobs=True, return_entropy=False, temperature=0.8)
        shifted = model(input_ids, return_token_logprobs=True, shift_targets=input_ids.roll(-1, 1), temperature=0.8)
    assert default.entropy is None and default.log_probs.shape == (3, 23) and shifted.log_probs.shape == (3, 24)
    torch.testing.assert_close(shifted.log_probs[:, :-1], default.log_probs, rtol=0, atol=0)


def test_shift_labels_are_used_unshifted_and_outputs_follow_return_dict():
    model = tiny("llama")
    input_ids, labels = batch()
    shift_labels = labels.roll(3, 1)
    inputs = dict(input_ids=input_ids, labels=labels, shift_labels=shift_labels)
    plain = model(input_ids=input_ids, labels=labels).loss.detach()
    expected, expected_grads = loss_and_grads(model, **inputs)
    patch(model)
    out, grads = loss_and_grads(model, **inputs)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_max(grad, expected_grads[name], 1e-5, 1e-6, msg=name)
    as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(input_ids=input_ids, labels=labels).loss)
    with torch.no_grad():  # skip_logits=True: the fused loss in eval mode too
        fused_eval = model.eval()(input_ids=input_ids, labels=labels, skip_logits=True)
    assert fused_eval.logits is None
    torch.testing.assert_close(fused_eval.loss, plain, rtol=1e-5, atol=1e-6)


def test_class_level_patch_covers_existing_and_new_instances():
    cls = causal_lm_class("qwen2")
    original = cls.__dict__["forward"]
    existing = tiny("qwen2")
    input_ids, labels = batch()
    expected = existing(input_ids=input_ids, labels=labels).loss
    try:
        assert patch("qwen2") is cls
        patch("qwen2", backend="reference")  # patching again replaces the options only
        assert cls.forward.__wrapped__ is original
        for model in (existing, tiny("qwen2")):
            out = model(input_ids=input_ids, labels=labels)
            assert out.logits is None
            torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    finally:
        unpatch("qwen2")
    assert cls.__dict__["forward"] is original
    assert existing(input_ids=input_ids, labels=labels).logits is not None


def test_generic_fallback_warns_and_matches():
    model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**COMMON)).train()
    input_ids, labels = batch()
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    with pytest.warns(UserWarning, match="'olmo' is not in CAUSAL_LM_CLASSES; patching OlmoForCausalLM with the "
                                         "generic fallback"):
        patch(model)
    out, grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_max(grad, expected_grads[name], 1e-5, 1e-6, msg=name)
    with pytest.warns(UserWarning, match="generic fallback"):
        assert causal_lm_class("olmo") is transformers.OlmoForCausalLM


def trainer_losses(model, output_dir: Path) -> list[float]:
    """The losses transformers' Trainer logs over 2 steps of 2 accumulated micro-batches (it passes
    ``num_items_in_batch``, the step's token count, to the forward)."""
    input_ids, labels = batch()
    rows = [{"input_ids": input_ids[i % 3], "labels": labels[i % 3]} for i in range(4)]
    args = transformers.TrainingArguments(output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                          max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_gradient_accumulation_logs_the_same_losses(tmp_path):
    expected = trainer_losses(tiny("qwen3"), tmp_path / "unpatched")
    losses = trainer_losses(patch(tiny("qwen3")), tmp_path / "patched")
    assert len(losses) == 2
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


class LowRank(nn.Module):
    """A stand-in for a LoRA adapter (not PEFT): ``base(x) + up(down(x))``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, 4, bias=False)
        self.up = nn.Linear(4, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_adapters_in_the_decoder_are_trained_exactly():
    model = tiny("mistral")
    attention = model.model.layers[0].self_attn
    attention.q_proj = LowRank(attention.q_proj)
    input_ids, labels = batch()
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    patch(model)
    out, grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert "model.layers.0.self_attn.q_proj.down.weight" in grads
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_max(grad, expected_grads[name], 1e-5, 1e-6, msg=name)


class AdapterWrapper(nn.Module):
    """A stand-in for a PEFT model wrapper: only ``get_base_model()`` matters to ``patch``."""

    def __init__(self, model):
        super().__init__()
        self.base = model

    def get_base_model(self):
        return self.base


def test_adapter_on_lm_head_is_refused():
    model = tiny("llama")
    model.lm_head = LowRank(model.lm_head)
    for target in (model, AdapterWrapper(model)):
        with pytest.raises(ValueError, match="the output layer is a LowRank, not a plain nn.Linear"):
            patch(target)
    clean = tiny("llama")
    patch(clean)
    clean.lm_head = LowRank(clean.lm_head)  # added after patching: refused at the next fused call
    input_ids, labels = batch()
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        clean(input_ids=input_ids, labels=labels)


def test_bad_arguments_are_refused_by_name():
    model = tiny("llama")
    input_ids, labels = batch()
    with pytest.raises(ValueError, match="model_type 'nope' has no causal-LM class"):
        patch("nope")
    with pytest.raises(TypeError, match="model_or_model_type must be a transformers causal LM or a "
                                        "config.model_type string, got int"):
        patch(3)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'torch', 'triton', 'cpu', 'cuda'\]"):
        patch(model, backend="fast")
    classifier = transformers.LlamaForSequenceClassification(model.config)
    with pytest.raises(TypeError, match="model must be a transformers \\*ForCausalLM"):
        patch(classifier)
    both = tiny("cohere")
    both.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="both logit scaling and final-logit softcapping is not supported: its "
                                         "config sets logit_scale=4.0 and final_logit_softcapping=30.0"):
        patch(both)

    patch(model)
    with pytest.raises(ValueError, match="logits_to_keep must be 0 with return_token_logprobs=True"):
        model(input_ids=input_ids, return_token_logprobs=True, logits_to_keep=1)
    with pytest.raises(ValueError, match="targets/shift_targets are read only with return_token_logprobs=True"):
        model(input_ids=input_ids, targets=labels)
    with pytest.raises(ValueError, match="temperature applies only to the fused outputs"):
        model(input_ids=input_ids, temperature=0.5)
    with pytest.raises(ValueError, match="pass targets .* or shift_targets .*, not both"):
        model(input_ids=input_ids, return_token_logprobs=True, targets=labels, shift_targets=labels)
    with pytest.raises(TypeError, match="return_token_logprobs"):
        model(input_ids=input_ids, return_token_logprobs="yes")


def test_peft_lora_in_the_decoder_trains_exactly_and_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    input_ids, labels = batch()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny("qwen3"), config)
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    patch(model)
    out, grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert out.logits is None and any("lora_B" in name for name in grads)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_max(grad, expected_grads[name], 1e-5, 1e-6, msg=name)
    on_head = peft.get_peft_model(tiny("qwen3"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        patch(on_head)


@pytest.fixture
def one_rank_group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_patched_model_trains_under_ddp_and_fsdp2(one_rank_group):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    input_ids, labels = batch()
    expected, expected_grads = loss_and_grads(tiny("mistral"), input_ids=input_ids, labels=labels)
    sharded = patch(tiny("mistral"))
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)  # lm_head in the root unit: gathered for the whole forward, loss included
    for wrapped in (DistributedDataParallel(patch(tiny("mistral"))), sharded):
        out, grads = loss_and_grads(wrapped, input_ids=input_ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            assert_close_to_max(grad, expected_grads[name.removeprefix("module.")], 1e-5, 1e-6, msg=name)

    own_unit = tiny("mistral")
    fully_shard(own_unit.lm_head)
    with pytest.raises(ValueError, match="or lm_head sharded as its own FSDP2 unit"):
        patch(own_unit)
