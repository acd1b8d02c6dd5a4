"""Output layers given as DTensors, on real processes over gloo (CPU, torch 2.13: FSDP2 ``fully_shard`` and
DTensor run there): an FSDP2-sharded ``lm_head`` used outside the module's forward (each rank its own
tokens) gives the unsharded model's loss and gradients; a DTensor sharded along the vocabulary with
``process_group`` runs the vocabulary-parallel path in place."""
import pytest
import torch
import torch.distributed as dist
from helpers.cases import assert_close
from helpers.gloo_ranks import run_ranks

from osft_kernels import linear_cross_entropy, linear_logprobs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # spawns gloo processes

VOCAB = 97  # uneven shards over 2 and 3 ranks


def tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (4, 13), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 4:9] = -100
    return input_ids, labels


def _fsdp2_worker(rank: int, world_size: int) -> None:
    """Every unit sharded, ``lm_head`` in its own: calling the decoder and then the fused loss with
    ``lm_head.weight`` (a DTensor: the head's forward never ran) is what TRL-style trainers do. FSDP2
    averages gradients over the ranks, so the expected gradient is that of the mean of the ranks'
    losses on the unsharded model, computed here with materialized logits."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference = tiny_model()
    input_ids, labels = batch()
    halves = [slice(2 * r, 2 * r + 2) for r in range(world_size)]

    def plain_loss(model, rows):
        logits = model(input_ids=input_ids[rows]).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[rows, 1:].reshape(-1))

    (sum(plain_loss(reference, rows) for rows in halves) / world_size).backward()

    model = tiny_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.model)
    fully_shard(model.lm_head)
    fully_shard(model)
    mine = halves[rank]
    hidden = model.model(input_ids=input_ids[mine]).last_hidden_state
    weight = model.lm_head.weight
    assert isinstance(weight, DTensor) and weight.shape == (VOCAB, 16)
    loss = linear_cross_entropy(hidden, weight, labels[mine], shift=True)
    expected = plain_loss(reference, mine)
    assert_close(loss, expected.detach(), rtol=1e-5, atol_rel=1e-5, what="loss")
    loss.backward()
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert_close(param.grad.full_tensor(), ref.grad, rtol=1e-4, atol_rel=1e-5, what=name)


def _vocab_parallel_worker(rank: int, world_size: int) -> None:
    """A weight (and bias) distributed ``Shard(0)`` over a one-dimensional mesh with the mesh's group as
    ``process_group``: the ranks share the tokens, and the DTensor gradient holds this rank's slice of the
    single-process one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 11, 16, generator=gen).requires_grad_()
    full_weight = torch.randn(VOCAB, 16, generator=gen) / 4
    full_bias = torch.randn(VOCAB, generator=gen)
    targets = torch.randint(0, VOCAB, (3, 11), generator=gen)
    weight = torch.nn.Parameter(distribute_tensor(full_weight.clone(), mesh, [Shard(0)]))
    bias = torch.nn.Parameter(distribute_tensor(full_bias.clone(), mesh, [Shard(0)]))
    out = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, shift=True, softcap=4.0,
                          process_group=mesh.get_group())
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()

    ref_params = [t.detach().double().requires_grad_() for t in (hidden, full_weight, full_bias)]
    logits = 4.0 * torch.tanh((ref_params[0][:, :-1] @ ref_params[1].T + ref_params[2]) / 4.0)
    logp = logits.log_softmax(-1)
    ref_logprobs = logp.gather(-1, targets[:, 1:, None])[..., 0]
    ref_entropy = -(logp.exp() * logp).sum(-1)
    assert_close(out.logprobs, ref_logprobs, rtol=1e-5, atol_rel=1e-5, what="logprobs")
    assert_close(out.entropy, ref_entropy, rtol=1e-5, atol_rel=1e-5, what="entropy")
    (ref_logprobs.sum() + 0.3 * ref_entropy.sum()).backward()
    assert_close(hidden.grad, ref_params[0].grad, rtol=1e-4, atol_rel=1e-5, what="d hidden")
    for name, param, ref in (("weight", weight, ref_params[1]), ("bias", bias, ref_params[2])):
        assert isinstance(param.grad, DTensor) and param.grad.placements == (Shard(0),), name
        assert_close(param.grad.full_tensor(), ref.grad, rtol=1e-4, atol_rel=1e-5, what=f"d {name}")

    with pytest.raises(TypeError, match="hidden is a DTensor"):
        linear_logprobs(distribute_tensor(hidden.detach(), mesh, [Replicate()]), weight, targets,
                        process_group=mesh.get_group())
    columns = torch.nn.Parameter(distribute_tensor(full_weight.clone(), mesh, [Shard(1)]))
    with pytest.raises(ValueError, match=r"sharded along the vocabulary \(dim 0\)"):
        linear_logprobs(hidden, columns, targets, process_group=mesh.get_group())
    alone = [dist.new_group([r]) for r in range(world_size)][rank]  # every rank creates every group
    with pytest.raises(ValueError, match="process_group must be the group of the weight's device mesh"):
        linear_logprobs(hidden, weight, targets, process_group=alone)
    # without process_group, a sharded weight is gathered: the single-process results on every rank
    gathered = linear_logprobs(hidden.detach(), weight, targets, bias=bias, shift=True, softcap=4.0).logprobs
    assert_close(gathered, ref_logprobs, rtol=1e-5, atol_rel=1e-5, what="gathered logprobs")


@pytest.mark.parametrize(("worker", "world_size"), [(_fsdp2_worker, 2), (_vocab_parallel_worker, 2),
                                                   (_vocab_parallel_worker, 3)],
                         ids=["fsdp2-2", "vocab-parallel-2", "vocab-parallel-3"])
def test_dtensor_output_layers(tmp_path, worker, world_size):
    run_ranks(worker, world_size, tmp_path)
