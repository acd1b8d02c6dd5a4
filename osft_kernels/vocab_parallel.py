"""Vocabulary-parallel ops: the ranks of a process group each hold a contiguous shard of the output layer.

Rank ``r`` holds rows ``offset_r : offset_r + V_r`` of the ``[V, D]`` weight (shards in rank order, any
sizes >= 1) and the same ``hidden`` and global ``targets`` as every other rank. It runs its backend on
its own shard with the targets moved into the shard's coordinates (a target on another shard falls
outside ``[0, V_r)``: its logit is 0 there and gets no gradient), all-gathers the per-row statistics
``[n, NUM_STATS]`` of every shard (O(n) values; logits never leave a rank), and merges them in rank
order into the statistics of the whole vocabulary (:meth:`VocabShard.merge`): every rank gets the same
results. The merge is differentiable in the rank's own statistics (the other ranks' are constants to
it), so autograd turns an upstream gradient into the gradient of this shard's statistics, which the
backend turns into the shard's weight gradient and this shard's part of ``hidden``'s; the backends sum
the parts over the ranks in the compute dtype before rounding them into ``hidden``'s dtype
(:attr:`osft_kernels.token_rows.TokenRows.hidden_grad_group`), unless the caller reduces them.

The gradients-in-forward strategy merges each token chunk's statistics before it forms that chunk's
gradient: one all-gather per chunk. Every rank plans its chunks for the largest shard
(:attr:`osft_kernels.backend.BackendOptions.plan_vocab`), so all run the same token chunks.
"""
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks
from .backend import Backend, BackendOptions
from .driver import LOG_ZERO
from .row_stats import ENTROPY, LSE, MAX_LOGIT, MEAN_LOGIT, NUM_STATS, SQUARE_LSE, TARGET_LOGIT
from .token_rows import TokenRows, compute_dtype


def check_process_group(process_group) -> None:
    """``process_group``: None or a ``torch.distributed`` group of an initialized default group."""
    if process_group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs torch.distributed to be initialized (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(process_group).__name__}")


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocabulary-parallel call: ``sizes`` of every rank's shard, in rank order."""

    group: dist.ProcessGroup
    rank: int
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, group: dist.ProcessGroup, hidden: Tensor, weight: Tensor) -> "VocabShard":
        """Exchange the shard sizes (one all-gather of three integers per rank) and check that every
        rank passed the same ``hidden [N, D]`` shape."""
        checks.check_head(hidden, weight, None)
        mine = torch.tensor([weight.shape[0], weight.shape[1], hidden.numel() // hidden.shape[-1]],
                            dtype=torch.int64, device=hidden.device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        shapes = [tuple(int(x) for x in part.tolist()) for part in parts]
        for rank, (_, dim, rows) in enumerate(shapes):
            if (dim, rows) != tuple(shapes[0][1:]):
                raise ValueError(f"process_group: every rank must pass the same (replicated) hidden [N, D]; "
                                 f"rank 0 has N={shapes[0][2]}, D={shapes[0][1]}, rank {rank} has N={rows}, D={dim}")
        return cls(group, dist.get_rank(group), tuple(size for size, _, _ in shapes))

    @property
    def vocab_size(self) -> int:
        """``V``, the whole vocabulary."""
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """The first vocabulary id of this rank's shard."""
        return sum(self.sizes[:self.rank])

    def local_rows(self, rows: TokenRows, *, reduce_hidden_grad: bool) -> TokenRows:
        """``rows`` with targets in this shard's coordinates and, with ``reduce_hidden_grad``, ``hidden``'s
        gradient summed over the ranks."""
        return replace(rows, targets=rows.targets - self.offset,
                       hidden_grad_group=self.group if reduce_hidden_grad else None)

    def gather(self, local: Tensor) -> Tensor:
        """``[world, n, NUM_STATS]``: every rank's statistics, this rank's entry the (differentiable) ``local``."""
        parts = [torch.empty_like(local) for _ in self.sizes]
        if local.shape[0]:
            dist.all_gather(parts, local.detach().contiguous(), group=self.group)
        parts[self.rank] = local
        return torch.stack(parts)

    def merge(self, local: Tensor, *, entropy: bool, mean: bool, square: bool) -> Tensor:
        """The statistics ``[n, NUM_STATS]`` of the whole vocabulary from every shard's (this rank's ``local``):

            lse = logsumexp_r lse_r,  w_r = e^(lse_r - lse)   (shard r's share of the probability)
            entropy = sum_r w_r (entropy_r - log w_r),  mean = sum_r V_r mean_r / V,
            target logit = sum_r target_r (0 off the target's shard),  max = max_r max_r,
            square_lse = logsumexp_r square_lse_r.
        """
        shards = self.gather(local)
        lse = torch.logsumexp(shards[..., LSE], dim=0)
        zero = torch.zeros_like(lse)
        columns = [lse, shards[..., TARGET_LOGIT].sum(0), zero, zero, shards[..., MAX_LOGIT].amax(0), zero]
        if mean:
            sizes = torch.tensor(self.sizes, dtype=local.dtype, device=local.device)
            columns[MEAN_LOGIT] = (sizes[:, None] * shards[..., MEAN_LOGIT]).sum(0) / self.vocab_size
        if entropy:  # a share that underflows to 0 adds 0, not 0 * inf
            log_share = (shards[..., LSE] - lse).clamp(min=LOG_ZERO)
            columns[ENTROPY] = (log_share.exp() * (shards[..., ENTROPY] - log_share)).sum(0)
        if square:
            columns[SQUARE_LSE] = torch.logsumexp(shards[..., SQUARE_LSE], dim=0)
        return torch.stack(columns, dim=1)

    def backend(self, impl: Backend) -> Backend:
        """``impl`` on this shard, its statistics merged over the ranks (see the module docstring)."""
        def row_stats(rows, weight, bias, softcap, *, entropy, mean, square, options: BackendOptions) -> Tensor:
            local = impl.row_stats(rows, weight, bias, softcap, entropy=entropy, mean=mean, square=square,
                                   options=options)
            return self.merge(local, entropy=entropy, mean=mean, square=square)

        def summed_loss(rows, weight, bias, softcap, token_loss, *, entropy, mean, options: BackendOptions):
            merged = rows.hidden.new_zeros(rows.num_rows, NUM_STATS, dtype=compute_dtype(weight.dtype))

            def shard_loss(local: Tensor, r0: int, r1: int) -> Tensor:
                stats = self.merge(local, entropy=entropy, mean=mean, square=False)
                merged[r0:r1] = stats.detach()
                return token_loss(stats, r0, r1)

            loss, _ = impl.summed_loss(rows, weight, bias, softcap, shard_loss, entropy=entropy, mean=mean,
                                       options=replace(options, plan_vocab=max(self.sizes)))
            return loss, merged

        return Backend(f"{impl.name} (vocabulary-parallel)", row_stats,
                       summed_loss=None if impl.summed_loss is None else summed_loss)


class SumOverRanksInBackward(torch.autograd.Function):
    """Identity on ``hidden``; its gradient is summed over the ranks of ``group``, as a replicated input's
    gradient must be when each rank differentiates through its own shard (the reference backend's way
    of honouring ``hidden_grad_group``: it applies this to its compute-dtype copy of the rows)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None
