"""An output layer given as DTensors (FSDP2's sharded parameters, tensor-parallel shards), turned into the
plain tensors the ops compute with, gradients flowing back to the DTensors.

* Without a ``process_group`` (data parallelism: FSDP2 ``fully_shard`` over ranks that each hold their
  own tokens), the layer is gathered once per call, ``full_tensor(grad_placements=[Partial("avg")])``:
  in backward each rank's gradient of the whole layer is averaged over the mesh and scattered back to
  the shards, as FSDP2 averages the gradients of the parameters it gathers itself (its default
  reduction; a module whose gradients FSDP2 sums or scales otherwise needs the loss computed inside its
  forward, where FSDP2 itself has gathered the plain parameter). A plain ``full_tensor()`` would leave
  each rank only its own tokens' gradient.
* With a ``process_group`` (vocabulary parallelism: the ranks hold the same tokens), a layer sharded
  along the vocabulary over a one-dimensional mesh of that group is used in place: each rank computes
  with its local rows (:mod:`osft_kernels.vocab_parallel`), and its gradient becomes the DTensor's.
"""
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Shard

from .vocab_parallel import check_process_group


def is_dtensor(value) -> bool:
    return isinstance(value, DTensor)


def plain_head(hidden, weight, bias, process_group) -> tuple:
    """``(weight, bias)`` as plain tensors (unchanged when neither is a DTensor), see the module docstring;
    ``hidden`` must be a plain tensor (this rank's tokens, or the replicated ones)."""
    if is_dtensor(hidden):
        raise TypeError("hidden is a DTensor: pass this rank's tokens as a plain tensor (hidden.to_local(), or "
                        "hidden.full_tensor() for replicated hidden states)")
    if not is_dtensor(weight) and not is_dtensor(bias):
        return weight, bias
    if bias is not None and is_dtensor(weight) != is_dtensor(bias):
        raise TypeError("weight and bias must both be DTensors or both plain tensors, got "
                        f"{type(weight).__name__} and {type(bias).__name__}")
    if process_group is None:  # averaged over every mesh dimension (FSDP2's, or HSDP's two)
        return tuple(None if t is None else t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
                     for t in (weight, bias))
    check_process_group(process_group)
    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements != (Shard(0),):
        raise ValueError(f"process_group with a DTensor weight needs it sharded along the vocabulary (dim 0) over "
                         f"a one-dimensional mesh, got placements {weight.placements} over a {mesh.ndim}-d mesh")
    ranks = dist.get_process_group_ranks(mesh.get_group())
    if ranks != dist.get_process_group_ranks(process_group):
        raise ValueError(f"process_group must be the group of the weight's device mesh (ranks {ranks}), got ranks "
                         f"{dist.get_process_group_ranks(process_group)}")
    if bias is not None and bias.placements != (Shard(0),):
        raise ValueError(f"bias must be sharded like weight (Shard(0)), got placements {bias.placements}")
    return tuple(None if t is None else t.to_local() for t in (weight, bias))
