"""The transformers patch under real two-process DDP and FSDP2 (gloo, CPU): each rank computes the fused
loss of its half of a batch inside the wrapped model's forward, and after backward every rank holds the
gradient of the whole batch, ``lm_head`` included (calling the decoder and the loss by hand bypasses
the wrapper and leaves the output layer's gradients unsynchronized)."""
import pytest
import torch
from helpers.gloo_ranks import run_ranks

transformers = pytest.importorskip("transformers")

from osft_kernels.integrations.transformers import patch
from osft_kernels.losses import ddp_num_items

pytestmark = pytest.mark.slow  # two gloo processes per test

VOCAB = 500


def tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return transformers.LlamaForCausalLM(config).train()


def batch():
    """Four sequences whose halves hold different numbers of loss tokens."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (4, 17), generator=gen)
    labels = input_ids.clone()
    labels[:2, :9] = -100
    labels[3, :3] = -100
    return input_ids, labels


def _wrapped(model, wrapper: str):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)  # lm_head in the root unit


def _worker(rank: int, world_size: int, result_file: str, wrapper: str):
    model = _wrapped(patch(tiny_model()), wrapper)
    input_ids, labels = batch()
    mine = slice(2 * rank, 2 * rank + 2)
    local_items = int((labels[mine, 1:] != -100).sum())
    loss = model(input_ids=input_ids[mine], labels=labels[mine],
                 num_items_in_batch=ddp_num_items(local_items)).loss
    loss.backward()
    module = model.module if wrapper == "ddp" else model
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for name, p in module.named_parameters()}
    torch.save(grads, f"{result_file}.{rank}")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_ranks_give_every_rank_the_whole_batch_gradient(tmp_path, wrapper):
    run_ranks(_worker, 2, tmp_path, str(tmp_path / "grads"), wrapper)
    ranks = [torch.load(tmp_path / f"grads.{rank}") for rank in range(2)]

    model = tiny_model()  # unpatched, one process, the whole batch
    input_ids, labels = batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert set(ranks[0]) == set(expected) and "lm_head.weight" in expected
    for name, grad in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()),
                                   msg=f"{name} differs from the whole batch's gradient")
