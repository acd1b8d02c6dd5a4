"""Data-parallel training under ``torchrun``: the process group, FSDP2 sharding of the model, and the
reductions the training loop needs (counts, metrics, evaluation results).

``torchrun --nproc_per_node K -m osft train CONFIG`` starts K processes; :func:`join_ranks` joins them
in one group (NCCL with one GPU per process, gloo on CPU). Without torchrun there is one process and
every reduction below is the identity.
"""
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError


@dataclass(frozen=True)
class Ranks:
    """The processes of a run: this one's ``rank`` among ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's logs, checkpoint files and progress."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous share of ``items``, the first ``len % size`` ranks one item more."""
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return items[start:start + base + (self.rank < extra)]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (in float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if self.size == 1:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def concatenated(self, items: list) -> list:
        """Every rank's ``items`` one after the other, in rank order: the inverse of :meth:`share`."""
        return [item for share in self.gather(items) for item in share]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            dist.barrier()

    def broadcast(self, value):
        """The main rank's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_processes() -> int:
    """How many processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Whether this is the process that speaks for a torchrun launch (``RANK`` 0; always without torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (FSDP2's sharded parameters, the norms torch computes over them), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _collective_device() -> torch.device:
    """Where the group's collectives take their tensors: the process's GPU with NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def join_ranks() -> Iterator[Ranks]:
    """The ranks of the process group that torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``): NCCL when there is a GPU per process (each process takes ``cuda:LOCAL_RANK``), gloo
    otherwise. The group is created here unless the caller already has one, and then destroyed on the
    way out. One process without torchrun: ``Ranks()``."""
    if launched_processes() == 1:
        yield Ranks()
        return
    created = not dist.is_initialized()
    if created:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count()
        if gpus:
            if local >= gpus:
                raise RuntimeError(f"process {local} on this node has no GPU of its own ({gpus} visible): start at "
                                   f"most {gpus} processes per node")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if gpus else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()


def check_ranks(config: Config, ranks: Ranks) -> None:
    """What a data-parallel run needs of the config: equal shares of every batch's prompts (a GRPO group
    stays on the rank that generated it)."""
    if config.prompts_per_step % ranks.size:
        raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be a multiple of the number of "
                          f"processes ({ranks.size}), so that every rank trains on an equal share of each batch")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (``model.base_model.layers`` and the like)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(model.base_model, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over all ranks: each decoder layer a unit, the rest (embeddings, final norm, output layer,
    tied or not) the root unit. The training forwards then run through the root's forward
    (:meth:`osft.model.CausalLM.hidden_states`), where FSDP2 gathers the output layer and later reduces
    its gradient with the others'."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
