"""Vocabulary-parallel ops on real processes over gloo (CPU): each rank passes its own uneven shard of
the vocabulary (one rank of three holds a single row) and the same hidden states and global targets.
Every rank's outputs, ``hidden``'s gradient and its shard's slice of the weight and bias gradients
must match the single-process float64 reference (tolerances of :mod:`helpers.cases`), for every
feature, fp32 and bf16, both gradient strategies and the backends that run on CPU."""
import pytest
import torch
import torch.distributed as dist
from helpers.cases import (
    FEATURES,
    assert_close,
    assert_grads_close,
    bf16_grad_tolerance,
    make_case,
    out_shape,
    reference_outputs,
    upstream_grads,
)
from helpers.gloo_ranks import run_ranks

from osft_kernels import linear_cross_entropy, linear_logprobs, linear_token_loss
from osft_kernels.driver import VOCAB_BLOCK
from osft_kernels.losses import grpo_loss, pear_loss, sft_loss

pytestmark = pytest.mark.slow  # spawns gloo processes

# shards in rank order: two ranks with a shard of several vocabulary blocks and a small one; three
# ranks with a single-row shard in the middle
SHARDS = {2: (2 * VOCAB_BLOCK + 304, 96), 3: (50, 1, 249)}
# the full-row budget of 128 rows of the largest 2-rank shard at 8 bytes per entry: two token chunks
# of 300 rows on every backend; 1 MiB: too few full rows of the largest shard fit (the small shard's
# would), so every rank takes the statistics pass and the recomputing backward
TWO_CHUNKS = 128 * SHARDS[2][0] * 8
TOO_SMALL_FOR_FULL_ROWS = 2**20
OPS = ("logprobs", "ce-none", "ce-sum", "ce-mean")


def _shard(case: dict, sizes: tuple, rank: int) -> tuple:
    """This rank's ``(weight, bias)`` leaves and its column range of the whole vocabulary."""
    start = sum(sizes[:rank])
    columns = slice(start, start + sizes[rank])
    weight = case["weight"].detach()[columns].clone().requires_grad_()
    bias = case["kwargs"].get("bias")
    return weight, None if bias is None else bias.detach()[columns].clone().requires_grad_(), columns


def _check_op(case: dict, op: str, sizes: tuple, rank: int, backend: str, **options) -> None:
    """One op of ``case`` on this rank's shard against the float64 reference of the whole vocabulary."""
    weight, bias, columns = _shard(case, sizes, rank)
    hidden = case["hidden"]
    kwargs = {**{k: v for k, v in case["kwargs"].items() if k != "bias"}, "bias": bias, "backend": backend,
              "process_group": dist.group.WORLD, **options}
    ref, ref_params = reference_outputs(case)
    up_lp, up_ent = upstream_grads(case)
    if op == "logprobs":
        out = linear_logprobs(hidden, weight, case["targets"], return_entropy=True, **kwargs)
        assert out.logprobs.shape == out_shape(case)
        assert_close(out.logprobs, ref["logprobs"], rtol=1e-5, atol_rel=1e-5, what="logprobs")
        assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol_rel=1e-5, what="entropy")
        ours = (out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum()
        expected = (ref["logprobs"] * up_lp).sum() + (ref["entropy"] * up_ent).sum()
    else:
        reduction = op.removeprefix("ce-")
        loss = linear_cross_entropy(hidden, weight, case["targets"], token_weights=case.get("token_weights"),
                                    reduction=reduction, **case["ce_kwargs"], **kwargs)
        assert_close(loss, ref[reduction], rtol=1e-5, atol_rel=1e-5, what=f"loss ({reduction})")
        weigh = (lambda x: (x * up_lp).sum()) if reduction == "none" else (lambda x: 0.75 * x)
        ours, expected = weigh(loss), weigh(ref[reduction])
    mine = [hidden, weight] + ([] if bias is None else [bias])
    grads = torch.autograd.grad(ours, mine, allow_unused=True)
    full = torch.autograd.grad(expected, ref_params)
    shard_of_full = [full[0], full[1][columns]] + ([] if bias is None else [full[2][columns]])
    assert_grads_close(grads, shard_of_full, hidden.dtype, op, bf16_grad_tolerance(backend, hidden.shape[-1]))


def _cases(world_size: int) -> list:
    """``(name, lead, d, dtype, feature, op, backend, options)`` of one world size."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for feature in FEATURES:
            for op in OPS:
                cases.append(((37,), 45, dtype, feature, op, "cpu", {}))
        for backend in ("torch", "reference", "triton"):
            for feature in ("plain", "everything"):
                for op in ("logprobs", "ce-mean"):
                    cases.append(((2, 19), 46, dtype, feature, op, backend, {}))
    if world_size == 2:
        for backend in ("cpu", "torch"):
            for budget in (TWO_CHUNKS, TOO_SMALL_FOR_FULL_ROWS):
                for op in ("ce-sum", "logprobs"):
                    cases.append(((300,), 32, torch.float32, "everything", op, backend, {"memory_budget": budget}))
    return cases


def _worker(rank: int, world_size: int) -> None:
    sizes = SHARDS[world_size]
    failures = []
    for lead, d, dtype, feature, op, backend, options in _cases(world_size):
        name = f"{feature} {op} {backend} {dtype} {lead} {options}"
        try:
            case = make_case(lead, d, sum(sizes), dtype, FEATURES[feature])
            _check_op(case, op, sizes, rank, backend, **options)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, f"rank {rank}: {len(failures)} failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_whole_vocabulary_results_and_its_shard_gradients(tmp_path, world_size):
    run_ranks(_worker, world_size, tmp_path, timeout=600.0)


def _losses_worker(rank: int, world_size: int) -> None:
    """The losses built on the ops take ``process_group`` through to them: the GRPO loss (entropy bonus,
    per-token gradients formed in forward), the SFT loss and the PEAR loss (sequence-level weights from
    the pass's own logprobs), against the same losses computed in one process in float64."""
    sizes = SHARDS[world_size]
    case = make_case((3, 23), 40, sum(sizes), torch.float32, FEATURES["shift"], seed=3)
    weight, _, columns = _shard(case, sizes, rank)
    gen = torch.Generator().manual_seed(5)
    mask_shape = out_shape(case)
    old = -torch.rand(mask_shape, generator=gen)
    advantages = torch.randn(3, generator=gen)
    temperature = case["kwargs"]["temperature"]

    def losses(hidden, weight, **options):
        policy, _ = grpo_loss(hidden, weight, case["targets"], old, advantages, entropy_coef=0.01, shift=True,
                              temperature=temperature, **options)
        pear = pear_loss(hidden, weight, case["targets"], old, level="sequence", shift=True, temperature=temperature,
                         **options)
        return policy + pear + sft_loss(hidden, weight, case["targets"], shift=True, temperature=temperature,
                                        **options)

    hidden = case["hidden"]
    loss = losses(hidden, weight, process_group=dist.group.WORLD)
    ref_hidden, ref_weight = (p.detach().double().requires_grad_() for p in (hidden, case["weight"]))
    ref = losses(ref_hidden, ref_weight, backend="reference")
    assert_close(loss, ref, rtol=1e-5, atol_rel=1e-5, what="grpo + pear + sft loss")
    grads = torch.autograd.grad(loss, [hidden, weight])
    full = torch.autograd.grad(ref, [ref_hidden, ref_weight])
    assert_grads_close(grads, [full[0], full[1][columns]], torch.float32, "grpo + pear + sft")


def _options_worker(rank: int, world_size: int) -> None:
    """``reduce_hidden_grad=False`` leaves each rank its own part of ``hidden``'s gradient (the parts sum
    to the whole); bad arguments are refused on every rank alike, before any collective can hang."""
    sizes = SHARDS[world_size]
    case = make_case((29,), 24, sum(sizes), torch.float32, FEATURES["ignored"], seed=4)
    weight, _, _ = _shard(case, sizes, rank)
    hidden, targets = case["hidden"], case["targets"]
    ref, ref_params = reference_outputs(case)
    (part,) = torch.autograd.grad(
        linear_cross_entropy(hidden, weight, targets, process_group=dist.group.WORLD, reduce_hidden_grad=False),
        [hidden])
    whole = part.clone()
    dist.all_reduce(whole)
    (expected,) = torch.autograd.grad(ref["mean"], ref_params[:1])
    assert_close(whole, expected, rtol=1e-4, atol_rel=1e-5, what="summed parts of hidden's gradient")
    assert not torch.allclose(part, whole), "a rank's own part is not the whole gradient"

    too_large = torch.full_like(targets, sum(sizes))
    with pytest.raises(ValueError, match=rf"targets.*\[0, {sum(sizes)}\)"):
        linear_logprobs(hidden, weight, too_large, process_group=dist.group.WORLD)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        linear_logprobs(hidden, weight, targets, process_group="world")
    with pytest.raises(TypeError, match="reduce_hidden_grad"):
        linear_logprobs(hidden, weight, targets, process_group=dist.group.WORLD, reduce_hidden_grad=1)
    # a rank whose hidden has other rows than the others' is named (the shapes are exchanged first)
    rows = 29 if rank == 0 else 28
    with pytest.raises(ValueError, match="same .replicated. hidden"):
        linear_logprobs(hidden[:rows], weight, targets[:rows], process_group=dist.group.WORLD)


@pytest.mark.parametrize("worker", [_losses_worker, _options_worker], ids=["losses", "options"])
def test_losses_and_options_on_three_ranks(tmp_path, worker):
    run_ranks(worker, 3, tmp_path)


def test_process_group_needs_an_initialized_group():
    case = make_case((5,), 8, 11, torch.float32, {})
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        linear_token_loss(case["hidden"], case["weight"], case["targets"], lambda lp, ent, index: -lp,
                          process_group=object())
