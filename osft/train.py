"""The training loop shared by the recipes: data order, gradient accumulation, optimizer and schedule,
checkpoints with exact resume, and logging.

A batch takes ``prompts_per_step`` rows in a seeded per-epoch order and lets the recipe turn them
into token sequences, which serve ``recipe.updates_per_batch`` optimizer steps (GRPO's
``num_iterations``). A run ends after ``max_steps`` (or ``epochs``), or after the batch whose
rollouts bring the generated-token count to ``max_rollout_tokens``. A step splits the batch into micro-batches of at most
``optim.micro_batch_tokens`` padded tokens and normalizes every micro-batch loss by the whole
batch's count (``num_items``), so the accumulated gradient does not depend on the micro-batching.
"""
import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .config import Config, ModelConfig, dump_config
from .data import load_rows, micro_batches
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import CausalLM, load_causal_lm
from .recipes import RECIPES, make_recipe

STATE_FILE = "trainer_state.pt"


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


class Checkpoints:
    """``run_dir/checkpoints/step-NNNNNN``: safetensors weights and tokenizer (loadable with
    ``from_pretrained``) plus optimizer, scheduler, RNG states, step and data position. Written to a
    temporary directory and renamed, so a killed run never leaves a partial checkpoint; the last
    ``keep_last`` are kept (with 0, none is written)."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, lm: CausalLM, optimizer, scheduler, step: int, position: int, rollout_tokens: int) -> Path:
        final = self.root / f"step-{step:06d}"
        temporary = self.root / f"step-{step:06d}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        lm.model.save_pretrained(temporary, safe_serialization=True)
        lm.tokenizer.save_pretrained(temporary)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "position": position, "rollout_tokens": rollout_tokens,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng}, temporary / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in self.all()[:-self.keep_last]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def restore(path: Path, optimizer, scheduler) -> tuple[int, int, int]:
        """``(step, position, rollout_tokens)`` of the checkpoint; restores the optimizer, scheduler and RNGs."""
        state = torch.load(path / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["position"], state["rollout_tokens"]


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


def drop_logged_after(path: Path, step: int) -> None:
    """Forget metrics of steps after ``step`` (logged by a run that was killed before its next checkpoint)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(config: Config, *, progress: bool = True) -> Path:
    """Run ``config`` to its last step; returns the run directory."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = Checkpoints(run_dir, config.keep_last)
    resume_from = checkpoints.latest() if config.resume == "auto" else None
    seed_everything(config.seed)
    model_config = config.model
    if resume_from is not None:  # the trainer continues from the checkpoint's weights
        model_config = ModelConfig(**{**vars(config.model), "path": str(resume_from)})
    lm = load_causal_lm(model_config, device)
    recipe = make_recipe(config, lm)
    rows = load_rows(config.data.train, [getattr(config.data, c) for c in RECIPES[config.recipe].columns])
    order = DataOrder(len(rows), config.seed)
    total_steps = config.max_steps or math.ceil(config.epochs * len(rows) / config.prompts_per_step)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  betas=(config.optim.beta1, config.optim.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    step, position, rollout_tokens = 0, 0, 0
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if resume_from is not None:
        step, position, rollout_tokens = Checkpoints.restore(resume_from, optimizer, scheduler)
        for path in (metrics_path, eval_path):
            drop_logged_after(path, step)
    else:
        for path in (metrics_path, eval_path):
            path.unlink(missing_ok=True)
    updates_left = 0  # optimizer steps the current batch still serves

    def finished() -> bool:
        return step >= total_steps or (0 < config.max_rollout_tokens <= rollout_tokens and updates_left == 0)

    if finished():
        return run_dir
    log = MetricLog(metrics_path, run_dir / "tensorboard" if config.tensorboard else None)
    try:
        eval_rows = load_eval_rows(config) if config.eval.data else None

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
                loss_sum, loss_metrics = 0.0, {}
                for micro in micro_batches(batch, config.optim.micro_batch_tokens):
                    loss, micro_metrics = recipe.loss(micro.to(device), num_items)
                    loss.backward()
                    loss_sum += loss.item()
                    share = micro.num_targets / max(batch.num_targets, 1)  # token-weighted mean over micro-batches
                    for name, value in micro_metrics.items():
                        loss_metrics[name] = loss_metrics.get(name, 0.0) + value * share
                grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), config.optim.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"step {step + 1}: gradient norm is {grad_norm.item()}; stopping before "
                                             f"the update (last checkpoint: {checkpoints.latest()})")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                updates_left -= 1
                seconds = time.perf_counter() - started
                metrics = {"step": step, "epoch": position / len(rows), "loss": loss_sum, "grad_norm": grad_norm.item(),
                           "lr": lr, "rollout_tokens": rollout_tokens, "tokens_per_s": float(batch.attention_mask.sum()) / seconds,
                           "peak_memory_gb": peak_memory_gb(device), **batch_metrics, **loss_metrics}
                last = finished()
                if step % config.log_every == 0 or last:
                    log.write(step, metrics)
                bar.update(task, completed=step, metrics=f"loss {loss_sum:.4f} grad {grad_norm.item():.3f}")
                if eval_rows and ((config.eval.every and step % config.eval.every == 0) or last):
                    run_evaluation(step, bar)
                save_due = save_due or bool(config.save_every and step % config.save_every == 0)
                # checkpoints are taken between batches (a batch may serve several updates), and at the end
                if config.keep_last and ((save_due and updates_left == 0) or last):
                    checkpoints.save(lm, optimizer, scheduler, step, position, rollout_tokens)
                    save_due = False
    finally:
        log.close()
    return run_dir
