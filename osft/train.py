"""The training loop shared by the recipes: data order, gradient accumulation, optimizer and schedule,
checkpoints with exact resume, and logging.

A batch takes ``prompts_per_step`` rows in a seeded per-epoch order and lets the recipe turn them
into token sequences, which serve ``recipe.updates_per_batch`` optimizer steps (GRPO's
``num_iterations``). A run ends after ``max_steps`` (or ``epochs``), or after the batch whose
rollouts bring the generated-token count to ``max_rollout_tokens``. A step splits the batch into micro-batches of at most
``optim.micro_batch_tokens`` padded tokens and normalizes every micro-batch loss by the whole
batch's count (``num_items``), so the accumulated gradient does not depend on the micro-batching.
The run directory's lock, checkpoints and resume checks live in :mod:`osft.run_dir`.
"""
import json
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .config import Config, ConfigError, ModelConfig, dump_config
from .data import load_rows, micro_batches, tokenize_prompts, tokenize_responses
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import CausalLM, load_causal_lm
from .recipes import RECIPES, make_recipe
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


def train(config: Config, *, progress: bool = True) -> Path:
    """Run ``config`` to its last step; returns the run directory. A run that cannot start as asked (the
    directory in use or not writable, a changed config, an earlier run's checkpoints) raises :class:`RunError`."""
    run_dir = Path(config.run_dir)
    check_writable(run_dir, "run_dir")
    with RunLock(run_dir):
        _run(config, run_dir, progress)
    return run_dir


def _run(config: Config, run_dir: Path, progress: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = Checkpoints(run_dir, config.keep_last)
    if config.keep_last:
        check_writable(checkpoints.root, "the checkpoint directory (keep_last > 0)")
    found = checkpoints.load_latest() if config.resume == "auto" else None
    if found is None and any(p.suffix != ".tmp" for p in checkpoints.root.glob("step-*")):
        reason = "none of them loads" if config.resume == "auto" else "resume: never"
        raise RunError(f"run_dir {run_dir} holds checkpoints of an earlier run ({reason}); a fresh run must not "
                       f"mix with them: use another run_dir, or delete {checkpoints.root} to start afresh there")
    rows = load_rows(config.data.train, [getattr(config.data, c) for c in RECIPES[config.recipe].columns])
    data_digest = file_digest(config.data.train)
    if found is not None:
        check_resume_config(config, data_digest, *found, run_dir)
    seed_everything(config.seed)
    model_config = config.model
    if found is not None:  # the trainer continues from the checkpoint's weights
        model_config = ModelConfig(**{**vars(config.model), "path": str(found[0])})
    lm = load_causal_lm(model_config, device)
    eval_rows = load_eval_rows(config) if config.eval.data else None
    check_position_limit(config, lm, rows, eval_rows)
    dump_config(config, run_dir / "config.yaml")
    recipe = make_recipe(config, lm)
    order = DataOrder(len(rows), config.seed)
    total_steps = config.max_steps or math.ceil(config.epochs * len(rows) / config.prompts_per_step)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  betas=(config.optim.beta1, config.optim.beta2))
    step, position, rollout_tokens = 0, 0, 0
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if found is not None:
        step, position, rollout_tokens = Checkpoints.restore(found[1], optimizer)
        for group in optimizer.param_groups:  # the config's values (they differ from the checkpoint's only if allowed)
            group.update(initial_lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                         betas=(config.optim.beta1, config.optim.beta2))
        for path in (metrics_path, eval_path):
            drop_logged_after(path, step)
    else:
        for path in (metrics_path, eval_path):
            path.unlink(missing_ok=True)
    # the schedule at ``step``, from the config's lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps), last_epoch=step - 1)
    updates_left = 0  # optimizer steps the current batch still serves

    def finished() -> bool:
        return step >= total_steps or (0 < config.max_rollout_tokens <= rollout_tokens and updates_left == 0)

    if finished():
        return
    log = MetricLog(metrics_path, run_dir / "tensorboard" if config.tensorboard else None)
    try:
        def run_evaluation(at_step: int, bar: Progress) -> None:
            results = evaluate(lm, config, eval_rows, progress=bar if progress else None)
            append_eval(eval_path, at_step, results)
            log.write(at_step, results, to_file=False)
            lm.model.train()

        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                   TextColumn("{task.fields[metrics]}"), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(config.recipe, total=total_steps, completed=step, metrics="")
            if eval_rows and step == 0 and config.eval.at_start:
                run_evaluation(0, bar)
            lm.model.train()
            save_due = False
            while not finished():
                started = time.perf_counter()
                if updates_left == 0:
                    batch_rows = [rows[i] for i in order.rows(position, config.prompts_per_step)]
                    batch, batch_metrics = recipe.make_batch(batch_rows, epoch=position / len(rows))
                    position += config.prompts_per_step
                    rollout_tokens += int(batch_metrics.get("completions/num_tokens", 0))
                    updates_left = recipe.updates_per_batch
                    num_items = recipe.num_items(batch)
                # the loss and the metrics stay on the device until the step's one read-back below
                loss_sum, loss_metrics = 0.0, {}
                for micro in micro_batches(batch, config.optim.micro_batch_tokens):
                    loss, micro_metrics = recipe.loss(micro.to(device), num_items)
                    loss.backward()
                    loss_sum = loss_sum + loss.detach()
                    share = micro.num_targets / max(batch.num_targets, 1)  # token-weighted mean over micro-batches
                    for name, value in micro_metrics.items():
                        loss_metrics[name] = loss_metrics.get(name, 0.0) + value * share
                grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), config.optim.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"step {step + 1}: gradient norm is {grad_norm.item()}; stopping before "
                                             f"the update (last checkpoint: {checkpoints.latest()})")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                # one fused norm over the weights, one sync: an update (e.g. a huge lr times weight decay) can
                # overflow them with finite gradients
                if not torch.isfinite(torch.nn.utils.get_total_norm(lm.model.parameters())):
                    raise FloatingPointError(f"step {step + 1}: the weights are not finite after the update (lr "
                                             f"{lr:g}); stopping (last checkpoint: {checkpoints.latest()})")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                updates_left -= 1
                loss_sum, grad_norm, loss_metrics = read_back(loss_sum, grad_norm, loss_metrics)
                seconds = time.perf_counter() - started
                metrics = {"step": step, "epoch": position / len(rows), "loss": loss_sum, "grad_norm": grad_norm,
                           "lr": lr, "rollout_tokens": rollout_tokens, "tokens_per_s": float(batch.attention_mask.sum()) / seconds,
                           "peak_memory_gb": peak_memory_gb(device), **batch_metrics, **loss_metrics}
                last = finished()
                if step % config.log_every == 0 or last:
                    log.write(step, metrics)
                bar.update(task, completed=step, metrics=f"loss {loss_sum:.4f} grad {grad_norm:.3f}")
                if eval_rows and ((config.eval.every and step % config.eval.every == 0) or last):
                    run_evaluation(step, bar)
                save_due = save_due or bool(config.save_every and step % config.save_every == 0)
                # checkpoints are taken between batches (a batch may serve several updates), and at the end
                if config.keep_last and ((save_due and updates_left == 0) or last):
                    checkpoints.save(lm, optimizer, step, position, rollout_tokens, config, data_digest)
                    save_due = False
    finally:
        log.close()
