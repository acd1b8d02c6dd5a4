"""``osft_kernels.integrations.trl``: TRL's trainers (SFT, GRPO, RLOO, DPO, KTO) train a tiny model (built from a
config, nothing downloaded) to the same logged losses/metrics and parameters with ``use_fused_ops()`` as with TRL's
own fused head, and the patched head's every output field matches a float64 reference from the model's own logits."""
import sys
import types
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers
from trl.trainer import utils as trl_utils

from osft_kernels import linear_token_outputs
from osft_kernels.integrations import trl as osft_trl

VOCAB = 1200
SPECIALS = ["<unk>", "<pad>", "</s>"]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=1, bos_token_id=None, eos_token_id=2)
MOE = dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts_per_tok=2,
           output_router_logits=True, router_aux_loss_coef=0.1)
ALL_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def trl_ops_restored():
    """Every test starts and ends with TRL's own head bound."""
    osft_trl.restore()
    yield
    osft_trl.restore()


def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")


def tiny(model_type="llama", **extra):
    """A tiny causal LM (vocabulary 1200, hidden 64, 2 layers), float32, training mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **COMMON, **extra)
        return transformers.AutoModelForCausalLM.from_config(config).train()


def words(seed: int, n: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 300, (n,), generator=gen).tolist())


def rows(kind: str) -> list[dict]:
    out = []
    for i in range(8):
        prompt, good, bad = words(i, 5 + i % 3), words(100 + i, 4 + i % 4), words(200 + i, 3 + i % 5)
        out.append({"sft": dict(text=prompt + " " + good),
                    "prompt": dict(prompt=prompt),
                    "pref": dict(prompt=prompt, chosen=" " + good, rejected=" " + bad),
                    "kto": dict(prompt=prompt, completion=" " + (good if i % 2 else bad), label=bool(i % 2))}[kind])
    return out


def word_reward(completions, **kwargs):
    """Varies between the completions of a prompt, so that advantages (and gradients) are not zero."""
    return [sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) / 1000 for c in completions]


COMMON_ARGS = dict(report_to="none", use_cpu=True, max_steps=2, logging_steps=1, save_strategy="no",
                   optim="sgd", learning_rate=0.05, per_device_train_batch_size=4, seed=0, dataloader_num_workers=0,
                   disable_tqdm=True, bf16=False)
RL_ARGS = dict(num_generations=2, max_completion_length=6, beta=0.05, temperature=0.9)
TRAINERS = {
    "sft": ("SFTTrainer", "SFTConfig", "sft", dict(max_length=32)),
    "grpo": ("GRPOTrainer", "GRPOConfig", "prompt", RL_ARGS),
    "rloo": ("RLOOTrainer", "RLOOConfig", "prompt", RL_ARGS),
    "dpo": ("DPOTrainer", "DPOConfig", "pref", dict(max_length=32)),
    "kto": ("KTOTrainer", "KTOConfig", "kto", dict(max_length=32, per_device_train_batch_size=8)),
}
# logged values that measure time, not the math
TIMING = ("runtime", "per_second", "step_time", "total_flos")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama and tokenizer saved, so that trainers build their reference models from the same path."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny().save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def train(name: str, model_dir, output_dir, **overrides) -> tuple[list[dict], dict]:
    """Trains ``TRAINERS[name]`` for 2 steps from the saved model (``overrides``: config fields); the logged dicts and
    final parameters."""
    trainer_class, config_class, data, extra = TRAINERS[name]
    records = []

    class Record(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            records.append(dict(logs))

    args = getattr(trl, config_class)(output_dir=str(output_dir), **{**COMMON_ARGS, **extra, **overrides})
    kwargs = dict(reward_funcs=word_reward) if name in ("grpo", "rloo") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = getattr(trl, trainer_class)(model=str(model_dir), args=args, processing_class=tokenizer(),
                                              train_dataset=datasets.Dataset.from_list(rows(data)),
                                              callbacks=[Record()], **kwargs)
        trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return records, params


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_logs_and_parameters_match_trls_own_head(name, model_dir, tmp_path, monkeypatch):
    """2 SGD steps from the same init and seed, float32 (``bf16=False``): every logged loss/metric within 1e-5
    relative or 1e-5 absolute (differences of log-probabilities summed over a sequence, e.g. KTO's ``kl`` or the DPO
    rewards, lose relative precision: measured <= 2e-6 absolute), parameters within 1e-5 relative + 1e-6 absolute
    (SGD: lr * the gradient difference)."""
    heads = []   # the lm_head weights our head was called with: the policy's, and the reference model's

    def spy(hidden, weight, *args, **kwargs):
        heads.append(weight.data_ptr())
        return linear_token_outputs(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(osft_trl, "linear_token_outputs", spy)
    theirs, their_params = train(name, model_dir, tmp_path / "trl")
    assert not heads
    osft_trl.use_fused_ops()
    ours, our_params = train(name, model_dir, tmp_path / "osft")
    assert len(set(heads)) == (1 if name == "sft" else 2)
    assert len(ours) == len(theirs) >= 2
    compared = 0
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        assert mine.keys() == ref.keys(), step
        for key, value in ref.items():
            if isinstance(value, (int, float)) and not any(t in key for t in TIMING):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key)
                compared += 1
    assert compared >= 4
    for n, p in their_params.items():
        torch.testing.assert_close(our_params[n], p, rtol=1e-5, atol=1e-6)
    initial = dict(tiny().named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in our_params.items()), "training changed no parameter"


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_bf16_autocast_trainers_match_within_bf16_rounding(name, model_dir, tmp_path):
    """TRL's default ``bf16=True`` (CPU autocast): both heads run their GEMMs in bfloat16 and sum in different
    orders. Measured: losses and entropy within 7e-6 relative (2e-7 absolute for GRPO's ~4e-6 loss), grad norms
    within 1e-3 relative, parameters within 2e-4 of each tensor's largest entry; checked at 1e-4, 5e-3, 1e-3."""
    theirs, their_params = train(name, model_dir, tmp_path / "trl", bf16=True)
    osft_trl.use_fused_ops()
    ours, our_params = train(name, model_dir, tmp_path / "osft", bf16=True)
    for mine, ref in zip(ours, theirs, strict=True):
        for key in ("loss", "entropy", "train_loss", "grad_norm"):
            if key in ref:
                rel = 5e-3 if key == "grad_norm" else 1e-4
                assert mine[key] == pytest.approx(ref[key], rel=rel, abs=1e-6), key
    for n, p in their_params.items():
        torch.testing.assert_close(our_params[n], p, rtol=0, atol=1e-3 * p.abs().max().item())


def test_use_fused_ops_rebinds_every_trainer_and_restore_undoes_it(monkeypatch):
    import trl.trainer
    from trl.trainer import dpo_trainer, grpo_trainer, kto_trainer, rloo_trainer, sft_trainer
    theirs = trl_utils.add_fused_lm_head
    modules = (trl_utils, trl.trainer, sft_trainer, grpo_trainer, rloo_trainer, dpo_trainer, kto_trainer)
    osft_trl.use_fused_ops(memory_budget=1 << 20)
    osft_trl.use_fused_ops()   # again: replaces the options, remembers TRL's function
    for module in modules:
        assert module.add_fused_lm_head.func is osft_trl.add_fused_lm_head, module.__name__
        assert module.add_fused_lm_head.keywords == dict(backend="auto", memory_budget=None)
    late = types.ModuleType("trl.imported_later")    # e.g. an experimental trainer imported after the call
    late.add_fused_lm_head = trl_utils.add_fused_lm_head
    monkeypatch.setitem(sys.modules, late.__name__, late)
    osft_trl.restore()
    assert all(module.add_fused_lm_head is theirs for module in (*modules, late))


def test_untested_trl_version_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"TRL 1\.17\.0 is installed.*allow_untested=True"):
        osft_trl.use_fused_ops()
    with pytest.warns(UserWarning, match="allow_untested"):
        osft_trl.use_fused_ops(allow_untested=True)
    assert trl_utils.add_fused_lm_head.func is osft_trl.add_fused_lm_head


def test_bad_arguments_are_refused_by_name():
    model = tiny()
    with pytest.raises(ValueError, match="outputs must be"):
        osft_trl.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature"):
        osft_trl.add_fused_lm_head(model, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        osft_trl.use_fused_ops(backend="cuda-magic")
    osft_trl.add_fused_lm_head(model)
    with pytest.raises(ValueError, match="fused_lm_head=True needs labels"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), fused_lm_head=True)


def reference(model, input_ids, targets, temperature, shifted: bool):
    """Float64 per-token fields from the model's own logits (its softcap/scaling included), 0 at -100."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.double() / temperature
    if not shifted:
        logits, targets = logits[:, :-1], targets[:, 1:]
    mask = targets != -100
    logp = logits.log_softmax(-1)
    p = logp.exp()
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    fields = dict(log_probs=picked, entropy=-(p * logp).sum(-1), log_sum_sq_probs=(p * p).sum(-1).log(),
                  mean_logits=logits.mean(-1),
                  is_top1=logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0] >= logits.max(-1).values)
    return {k: torch.where(mask, v, torch.zeros((), dtype=v.dtype)) for k, v in fields.items()}, mask


def batch(T=12):
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, T), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    return input_ids, labels


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("gemma2", dict(final_logit_softcapping=0.5)),
                                              ("granite", dict(logits_scaling=4.0)), ("qwen2_moe", MOE)],
                         ids=["llama", "gemma2-softcap", "granite-scale", "qwen2_moe"])
@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
@pytest.mark.parametrize("temperature,items", [(1.0, None), (0.7, 7)], ids=["t1", "t0.7-items"])
def test_every_field_matches_a_float64_reference(model_type, extra, shifted, temperature, items):
    model = tiny(model_type, **extra)
    input_ids, labels = batch()
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) if shifted else labels
    expected, mask = reference(model, input_ids, targets, temperature, shifted)
    with torch.no_grad():
        own = model(input_ids=input_ids, labels=labels)    # the model's own loss (and router aux loss)
    osft_trl.add_fused_lm_head(model, temperature=temperature, outputs=ALL_FIELDS)
    call = dict(shift_labels=targets) if shifted else dict(labels=targets)
    out = model(input_ids=input_ids, fused_lm_head=True, num_items_in_batch=items, **call)
    assert isinstance(out, trl_utils.FusedCausalLMOutput)
    assert torch.equal(out.label_mask, mask)
    assert torch.equal(out.is_top1, expected["is_top1"])
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(out[name].double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)
    nll = -expected["log_probs"].sum() / (mask.sum() if items is None else items)
    aux = 0.0
    if "output_router_logits" in extra:
        torch.testing.assert_close(out.aux_loss, own.aux_loss, rtol=1e-6, atol=0)
        aux = extra["router_aux_loss_coef"] * own.aux_loss.double()
    else:
        assert out.aux_loss is None
    torch.testing.assert_close(out.loss.double(), nll + aux, rtol=1e-5, atol=0)
    if temperature == 1.0 and items is None:
        torch.testing.assert_close(out.loss, own.loss, rtol=1e-5, atol=0)


def test_unrequested_fields_are_none_and_other_calls_are_the_original_forward():
    model = tiny()
    input_ids, labels = batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, labels=labels)
    osft_trl.add_fused_lm_head(model)
    with torch.no_grad():
        after = model(input_ids=input_ids, labels=labels)
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert out.entropy is None and out.mean_logits is None and out.is_top1 is None and out.log_sum_sq_probs is None
    generated = model.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert generated.shape == (1, 7)


def test_gradients_and_cast_lm_head_to_fp32_match_trls_head():
    """bf16 model: with cast_lm_head_to_fp32 both heads run in float32; loss within 1e-5 and gradients within 2e-2
    of their largest entry (both backbones run in bf16 and round differently downstream of the head)."""
    input_ids, labels = batch()
    results = []
    for add in (trl_utils.add_fused_lm_head, osft_trl.add_fused_lm_head):
        model = tiny().to(torch.bfloat16)
        add(model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        results.append((out, {n: p.grad.float() for n, p in model.named_parameters()}))
    (mine, my_grads), (ref, ref_grads) = results[1], results[0]
    assert mine.log_probs.dtype == torch.float32
    torch.testing.assert_close(mine.loss, ref.loss, rtol=1e-5, atol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(my_grads[n], g, rtol=0, atol=2e-2 * g.abs().max().item(), msg=n)


@pytest.mark.parametrize("model_dtype,autocast,cast,expected", [
    (torch.float32, False, False, torch.float32), (torch.float32, True, False, torch.bfloat16),
    (torch.float32, True, True, torch.float32), (torch.bfloat16, False, False, torch.bfloat16),
    (torch.bfloat16, False, True, torch.float32)])
def test_head_precision_follows_autocast_unless_cast_to_fp32(model_dtype, autocast, cast, expected, monkeypatch):
    """As TRL's head: its GEMMs in autocast's dtype inside an autocast region, in float32 with
    ``cast_lm_head_to_fp32``, else in the model's dtype."""
    seen = []

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return linear_token_outputs(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(osft_trl, "linear_token_outputs", spy)
    model = tiny().to(model_dtype)
    osft_trl.add_fused_lm_head(model, cast_lm_head_to_fp32=cast)
    input_ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert seen == [(expected, expected)]
    assert out.log_probs.dtype == torch.float32


def test_unsupported_logit_scaling_is_refused():
    with pytest.raises(ValueError, match="lm_head_multiplier"):
        osft_trl.add_fused_lm_head(tiny(lm_head_multiplier=2.0))


def test_adapter_on_lm_head_is_refused():
    model = tiny()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises((TypeError, ValueError), match="lm_head"):
        osft_trl.add_fused_lm_head(model)
