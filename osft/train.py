"""The training loop shared by the recipes: data order, gradient accumulation, optimizer and schedule,
checkpoints with exact resume, and logging.

A batch takes ``prompts_per_step`` rows in a seeded per-epoch order and lets the recipe turn them
into token sequences, which serve ``recipe.updates_per_batch`` optimizer steps (GRPO's
``num_iterations``). A run ends after ``max_steps`` (or ``epochs``), or after the batch whose
rollouts bring the generated-token count to ``max_rollout_tokens``. A step splits the batch into
micro-batches of at most ``optim.micro_batch_tokens`` padded tokens and normalizes every micro-batch loss by the whole
batch's count (``num_items``), so the accumulated gradient does not depend on the micro-batching.
The run directory's lock, checkpoints and resume checks live in :mod:`osft.run_dir`.

Under ``torchrun`` (:mod:`osft.distributed`) every rank takes an equal share of each batch's prompts
and trains an FSDP2-sharded model; the batch count that normalizes the losses is the sum over the
ranks, divided by their number because FSDP2 averages gradients, so the gradient is the one a single
process gets for the whole batch. The main rank writes the logs and checkpoint files, with metrics
reduced over the ranks; evaluation splits its prompts over the ranks and merges the results.
"""
import contextlib
import json
import math
import random
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from osft_kernels import backend_name
from osft_kernels.losses import ddp_num_items

from .config import Config, ConfigError, ModelConfig, dump_config
from .data import Sequences, load_rows, micro_batches, tokenize_prompts, tokenize_responses
from .distributed import Ranks, check_ranks, join_ranks, shard_model, whole
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import CausalLM, default_device, load_causal_lm
from .recipes import RECIPES, Recipe, make_recipe
from .rollout import RolloutEngine, make_engine
from .run_dir import Checkpoints, RunError, RunLock, check_resume_config, check_writable, drop_logged_after, file_digest


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class DataOrder:
    """Row indices in a fresh seeded permutation per epoch; ``position`` counts the rows consumed."""

    num_rows: int
    seed: int

    def rows(self, position: int, count: int) -> list[int]:
        out = []
        for index in range(position, position + count):
            epoch, offset = divmod(index, self.num_rows)
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(order[offset]))
        return out


def lr_lambda(config: Config, total_steps: int):
    warmup = config.optim.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.optim.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def read_back(loss, grad_norm, metrics: dict) -> tuple[float, float, dict[str, float]]:
    """A step's loss, gradient norm and metrics (tensors on the device, or numbers) as Python floats,
    copied back in one transfer."""
    names = list(metrics)
    values = [torch.as_tensor(v, dtype=torch.float32, device=grad_norm.device).reshape(())
              for v in (loss, grad_norm, *metrics.values())]
    loss, grad_norm, *rest = torch.stack(values).tolist()
    return loss, grad_norm, dict(zip(names, rest))


# batch metrics that add up over the ranks' shares; the others are means over equal shares
SUMMED_BATCH_METRICS = ("completions/num_tokens",)


def merge_batch_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One batch's metrics from its ranks' shares (equal numbers of prompts, so means average)."""
    return {name: (sum if name in SUMMED_BATCH_METRICS else statistics.fmean)([m[name] for m in per_rank])
            for name in per_rank[0]}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricLog:
    """Metrics to ``metrics.jsonl`` (one JSON object per logged step) and, optionally, TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None):
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("tensorboard: true needs the tensorboard package: "
                                   "pip install tensorboard") from error
            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, metrics: dict[str, float], *, to_file: bool = True) -> None:
        if to_file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _position_limit(lm: CausalLM) -> tuple[str, int] | None:
    config = lm.model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return name, int(getattr(config, name))
    return None


def check_position_limit(config: Config, lm: CausalLM, rows: list[dict], eval_rows: list[dict] | None) -> None:
    """Refuse prompts plus responses beyond the model's position limit before any work. Prompts (and SFT/PEAR
    responses) are tokenized only when the configured maxima exceed the limit."""
    found = _position_limit(lm)
    if found is None:
        return
    name, limit = found
    data = config.data
    generated = ("rollout.max_new_tokens", config.rollout.max_new_tokens)
    checks = [(rows, data.train, generated if config.recipe in ("osft", "grpo") else
               ("data.max_response_tokens", data.max_response_tokens))]
    if eval_rows:
        checks.append((eval_rows, config.eval.data, generated))
    for check_rows, file, (key, budget) in checks:
        if data.max_prompt_tokens + budget <= limit:
            continue
        prompt = max(map(len, tokenize_prompts(check_rows, data, lm.tokenizer)))
        if key == "data.max_response_tokens":
            budget = max(map(len, tokenize_responses(check_rows, data, lm.tokenizer)))
        if prompt + budget > limit:
            raise ConfigError(f"data.max_prompt_tokens + {key}: prompts of up to {prompt} tokens (in {file}) plus "
                              f"{budget} response tokens exceed the model's position limit ({name}={limit} in "
                              f"model.path {config.model.path}); lower data.max_prompt_tokens or {key}")


METRICS_FILE, EVAL_FILE = "metrics.jsonl", "eval.jsonl"


def train(config: Config, *, progress: bool = True) -> Path:
    """Run ``config`` to its last step, on the ranks of a torchrun launch if there is one; returns the run
    directory. A run that cannot start as asked (the directory in use or not writable, a changed config,
    an earlier run's checkpoints) raises :class:`RunError`."""
    with join_ranks() as ranks:
        check_ranks(config, ranks)
        run_dir = Path(config.run_dir)
        check_writable(run_dir, "run_dir")
        with RunLock(run_dir) if ranks.main else contextlib.nullcontext():
            _run(config, run_dir, progress and ranks.main, ranks)
    return run_dir


@dataclass
class RunState:
    """Where a run stands between optimizer steps: the counters a checkpoint keeps, and the batch in use."""

    step: int = 0
    position: int = 0        # data rows consumed
    rollout_tokens: int = 0  # generated tokens so far
    batch: Sequences | None = None
    batch_metrics: dict[str, float] = field(default_factory=dict)
    num_items: float = 1.0   # the batch's count (recipe.num_items; over the ranks, per rank)
    updates_left: int = 0    # optimizer steps the batch still serves
    save_due: bool = False   # a checkpoint is due at the end of the batch


@dataclass
class Run:
    """One training run, set up by :func:`start_run` (fresh or from its last checkpoint)."""

    config: Config
    lm: CausalLM
    recipe: Recipe
    engine: RolloutEngine | None  # the recipe's and the evaluation's (None when neither generates)
    rows: list[dict]
    order: DataOrder
    eval_rows: list[dict] | None
    data_digest: str
    checkpoints: Checkpoints
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    state: RunState
    ranks: Ranks = Ranks()

    def finished(self) -> bool:
        state, budget = self.state, self.config.max_rollout_tokens
        return state.step >= self.total_steps or (0 < budget <= state.rollout_tokens and state.updates_left == 0)

    def next_batch(self) -> None:
        """The recipe's batch of this rank's share of the next ``prompts_per_step`` rows in the data order."""
        config, state, ranks = self.config, self.state, self.ranks
        indices = ranks.share(self.order.rows(state.position, config.prompts_per_step))
        state.batch, metrics = self.recipe.make_batch([self.rows[i] for i in indices],
                                                      epoch=state.position / len(self.rows))
        state.batch_metrics = merge_batch_metrics(ranks.gather(metrics))
        state.position += config.prompts_per_step
        state.rollout_tokens += int(state.batch_metrics.get("completions/num_tokens", 0))
        state.updates_left = self.recipe.updates_per_batch
        # FSDP2 averages the ranks' gradients: each rank divides by the whole batch's count over their number
        state.num_items = ddp_num_items(self.recipe.num_items(state.batch))

    def step(self) -> dict[str, float]:
        """One optimizer step over the batch's micro-batches (a new batch first when the last one is
        spent); returns the step's metrics. A non-finite gradient norm stops the run before the
        update, non-finite weights after it."""
        config, state = self.config, self.state
        started = time.perf_counter()
        if state.updates_left == 0:
            self.next_batch()
        batch = state.batch
        # the loss and the metrics stay on the device until the step's one read-back below
        loss_sum, loss_metrics = 0.0, {}
        for micro in micro_batches(batch, config.optim.micro_batch_tokens, padding_free=self.lm.padding_free):
            loss, micro_metrics = self.recipe.loss(micro.to(self.lm.device), state.num_items)
            loss.backward()
            loss_sum = loss_sum + loss.detach()
            share = micro.num_targets / max(batch.num_targets, 1)  # token-weighted mean over micro-batches
            for name, value in micro_metrics.items():
                loss_metrics[name] = loss_metrics.get(name, 0.0) + value * share
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(self.lm.model.parameters(), config.optim.max_grad_norm))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {state.step + 1}: gradient norm is {grad_norm.item()}; stopping before "
                                     f"the update (last checkpoint: {self.checkpoints.latest()})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        # one fused norm over the weights, one sync: an update (e.g. a huge lr times weight decay) can
        # overflow them with finite gradients
        if not torch.isfinite(whole(torch.nn.utils.get_total_norm(self.lm.model.parameters()))):
            raise FloatingPointError(f"step {state.step + 1}: the weights are not finite after the update (lr "
                                     f"{lr:g}); stopping (last checkpoint: {self.checkpoints.latest()})")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.updates_left -= 1
        loss_sum, grad_norm, loss_metrics = read_back(loss_sum, grad_norm, loss_metrics)
        # over the ranks: the loss is the sum of their shares (each scaled up by their number, see
        # next_batch), the token-weighted metrics are weighted by each rank's target count
        targets, names = batch.num_targets, list(loss_metrics)
        loss_sum, tokens, targets, *weighted = self.ranks.sum(
            [loss_sum, float(batch.attention_mask.sum()), targets, *(loss_metrics[n] * targets for n in names)])
        loss_metrics = {name: value / max(targets, 1) for name, value in zip(names, weighted)}
        seconds = time.perf_counter() - started
        return {"step": state.step, "epoch": state.position / len(self.rows), "loss": loss_sum / self.ranks.size,
                "grad_norm": grad_norm, "lr": lr, "rollout_tokens": state.rollout_tokens,
                "tokens_per_s": tokens / seconds,
                "peak_memory_gb": self.ranks.max([peak_memory_gb(self.lm.device)])[0], **state.batch_metrics,
                **loss_metrics}

    def save_if_due(self, last: bool) -> None:
        """A checkpoint every ``save_every`` steps, taken between batches (a batch may serve several
        updates), and at the end."""
        config, state = self.config, self.state
        state.save_due = state.save_due or bool(config.save_every and state.step % config.save_every == 0)
        if config.keep_last and ((state.save_due and state.updates_left == 0) or last):
            self.checkpoints.save(self.lm, self.optimizer, state.step, state.position, state.rollout_tokens, config,
                                  self.data_digest, self.ranks)
            state.save_due = False


def start_run(config: Config, run_dir: Path, ranks: Ranks = Ranks()) -> Run:
    """Load the data and the model (sharded over ``ranks`` when there are several), and restore the last
    checkpoint when resuming (its weights, optimizer, counters; the logs cut back to its step), after
    refusing what must not run. The main rank picks the checkpoint; the others follow."""
    checkpoints = Checkpoints(run_dir, config.keep_last)
    if config.keep_last:
        check_writable(checkpoints.root, "the checkpoint directory (keep_last > 0)")
    found = ranks.broadcast(checkpoints.load_latest() if config.resume == "auto" and ranks.main else None)
    if found is None and any(p.suffix != ".tmp" for p in checkpoints.root.glob("step-*")):
        reason = "none of them loads" if config.resume == "auto" else "resume: never"
        raise RunError(f"run_dir {run_dir} holds checkpoints of an earlier run ({reason}); a fresh run must not "
                       f"mix with them: use another run_dir, or delete {checkpoints.root} to start afresh there")
    rows = load_rows(config.data.train, [getattr(config.data, c) for c in RECIPES[config.recipe].columns])
    data_digest = file_digest(config.data.train)
    if found is not None:
        check_resume_config(config, data_digest, *found, run_dir)
    seed_everything(config.seed + ranks.rank)  # the ranks sample their own prompts with their own streams
    model_config = config.model
    if found is not None:  # the trainer continues from the checkpoint's weights
        model_config = ModelConfig(**{**vars(config.model), "path": str(found[0])})
    lm = load_causal_lm(model_config, default_device())
    if ranks.size > 1:
        shard_model(lm.model)
        lm.sharded = True
    eval_rows = load_eval_rows(config) if config.eval.data else None
    check_position_limit(config, lm, rows, eval_rows)
    if ranks.main:
        dump_config(config, run_dir / "config.yaml")
    engine = make_engine(lm, config) if RECIPES[config.recipe].generates or eval_rows else None
    recipe = make_recipe(config, lm, engine)
    total_steps = config.max_steps or math.ceil(config.epochs * len(rows) / config.prompts_per_step)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  betas=(config.optim.beta1, config.optim.beta2))
    state = RunState()
    logs = (run_dir / METRICS_FILE, run_dir / EVAL_FILE)
    if found is not None:
        state.step, state.position, state.rollout_tokens = Checkpoints.restore(*found, lm, optimizer, ranks)
        for group in optimizer.param_groups:  # the config's values (they differ from the checkpoint's only if allowed)
            group.update(initial_lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                         betas=(config.optim.beta1, config.optim.beta2))
    for path in logs if ranks.main else ():
        if found is not None:
            drop_logged_after(path, state.step)
        else:
            path.unlink(missing_ok=True)
    # the schedule at ``step``, from the config's lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps),
                                                  last_epoch=state.step - 1)
    return Run(config, lm, recipe, engine, rows, DataOrder(len(rows), config.seed), eval_rows, data_digest,
               checkpoints, optimizer, scheduler, total_steps, state, ranks)


def _run(config: Config, run_dir: Path, progress: bool, ranks: Ranks = Ranks()) -> None:
    """The run's loop; ``progress`` (a bar and the opening line) and the logs on the main rank only."""
    run = start_run(config, run_dir, ranks)
    if progress:
        lm = run.lm
        processes = f", {ranks.size} processes (FSDP2)" if ranks.size > 1 else ""
        print(f"{config.recipe}: {config.model.path} on {lm.device}{processes}, attention {lm.attention}, "
              f"fused loss backend {backend_name(lm.backend, lm.device)}")
    if run.finished():
        return
    log = MetricLog(run_dir / METRICS_FILE, run_dir / "tensorboard" if config.tensorboard else None) \
        if ranks.main else None
    try:
        def run_evaluation(at_step: int, bar: Progress) -> None:
            evaluation = evaluate(run.lm, config, run.eval_rows, run.engine, progress=bar if progress else None,
                                  ranks=ranks)
            if log is not None:
                append_eval(run_dir / EVAL_FILE, at_step, evaluation)
                log.write(at_step, evaluation.metrics, to_file=False)
            run.lm.model.train()

        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                   TextColumn("{task.fields[metrics]}"), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(config.recipe, total=run.total_steps, completed=run.state.step, metrics="")
            if run.eval_rows and run.state.step == 0 and config.eval.at_start:
                run_evaluation(0, bar)
            run.lm.model.train()
            while not run.finished():
                metrics = run.step()
                step, last = run.state.step, run.finished()
                if log is not None and (step % config.log_every == 0 or last):
                    log.write(step, metrics)
                bar.update(task, completed=step, metrics=f"loss {metrics['loss']:.4f} grad {metrics['grad_norm']:.3f}")
                if run.eval_rows and ((config.eval.every and step % config.eval.every == 0) or last):
                    run_evaluation(step, bar)
                run.save_if_due(last)
    finally:
        if log is not None:
            log.close()
