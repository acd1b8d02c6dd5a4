"""The training loop shared by the recipes: data order, gradient accumulation, optimizer and schedule,
checkpoints with exact resume, and logging.

A batch takes ``prompts_per_step`` rows in a seeded per-epoch order and lets the recipe turn them
into token sequences, which serve ``recipe.updates_per_batch`` optimizer steps (GRPO's
``num_iterations``). A run ends after ``max_steps`` (or ``epochs``), or after the batch whose
rollouts bring the generated-token count to ``max_rollout_tokens``. A step splits the batch into micro-batches of at most
``optim.micro_batch_tokens`` padded tokens and normalizes every micro-batch loss by the whole
batch's count (``num_items``), so the accumulated gradient does not depend on the micro-batching.

One run at a time owns a run directory (``run.lock``). ``resume: auto`` continues from the newest
intact checkpoint and refuses a training config that differs from the checkpoint's (keys in
``FREE_ON_RESUME`` excepted) unless ``resume_changed: allow``, which applies the new values and
records them in ``config_changes.jsonl``. A fresh run refuses a directory holding checkpoints.
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open

from .config import Config, ConfigError, ModelConfig, dump_config
from .data import load_rows, micro_batches, tokenize_prompts, tokenize_responses
from .evaluate import append_eval, evaluate, load_eval_rows
from .model import CausalLM, load_causal_lm
from .recipes import RECIPES, make_recipe

STATE_FILE = "trainer_state.pt"
LOCK_FILE = "run.lock"
CHANGES_FILE = "config_changes.jsonl"
# keys that change how a run is logged, evaluated, checkpointed or computed, not what it trains; a
# resume may change them freely (a key ending in "." covers its section)
FREE_ON_RESUME = ("run_dir", "resume", "resume_changed", "log_every", "tensorboard", "save_every", "keep_last",
                  "eval.", "model.gradient_checkpointing", "model.backend", "optim.micro_batch_tokens",
                  "rollout.engine", "rollout.batch_size", "rollout.vllm_memory_fraction")
DATA_DIGEST = "data.train (sha256 of the file)"


class RunError(RuntimeError):
    """A run that cannot start as asked, naming the file, directory or key concerned."""


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
    ``from_pretrained``) plus optimizer and RNG states, step and data position (the schedule follows
    from the step), the run's config and its data file's digest (a resume compares them with its own).
    Written to a temporary directory and renamed, so a killed run never leaves a partial checkpoint;
    the last ``keep_last`` (by step number) are kept (with 0, none is written)."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        """The checkpoints, oldest first (by step number)."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def load_latest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint whose weights and trainer state load, with that state. A corrupt one
        is renamed ``step-N.corrupt`` with a warning, and the one before it is tried."""
        for path in reversed(self.all()):
            try:
                weights = sorted(path.glob("*.safetensors"))
                if not weights:
                    raise FileNotFoundError("no *.safetensors weights")
                for file in weights:
                    with safe_open(str(file), framework="pt"):  # reads and checks the header only
                        pass
                state = torch.load(path / STATE_FILE, weights_only=False)
            except Exception as error:  # noqa: BLE001 (any failure to load makes it unusable)
                aside = path.with_name(path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)
                path.rename(aside)
                warnings.warn(f"checkpoint {path} does not load ({type(error).__name__}: {error}); moved it to "
                              f"{aside.name} and trying the one before", stacklevel=2)
                continue
            return path, state
        return None

    def save(self, lm: CausalLM, optimizer, step: int, position: int, rollout_tokens: int, config: Config,
             data_digest: str) -> Path:
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
                    "optimizer": optimizer.state_dict(), "rng": rng,
                    "config": dataclasses.asdict(config), "data_digest": data_digest}, temporary / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in self.all()[:-self.keep_last]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def restore(state: dict, optimizer) -> tuple[int, int, int]:
        """``(step, position, rollout_tokens)`` of a checkpoint's trainer state; restores the optimizer and RNGs."""
        optimizer.load_state_dict(state["optimizer"])
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


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` through a synced temporary file, so a kill leaves the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def _read_log(path: Path) -> list[tuple[str, dict]]:
    """The ``(line, record)`` pairs of a JSONL log whose records carry a ``step``. A torn last line (a write
    cut short, e.g. by a full disk) is dropped with a warning; a bad line elsewhere is an error naming it."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines):
                warnings.warn(f"{path}: dropping its torn last line {number} ({type(error).__name__}: {error})",
                              stacklevel=3)
                break
            raise RunError(f"{path} line {number} is not a JSON object with a step ({type(error).__name__}: "
                           f"{error}); repair or delete that line") from None
        records.append((line, record))
    return records


def drop_logged_after(path: Path, step: int) -> None:
    """Forget metrics of steps after ``step`` (logged by a run that was killed before its next checkpoint)."""
    if path.exists():
        _write_atomically(path, "".join(line + "\n" for line, record in _read_log(path) if record["step"] <= step))


def _check_writable(directory: Path, what: str) -> None:
    """Create ``directory`` and write a file into it, or fail naming it: before any work, not at the first save."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise RunError(f"{what} {directory} is not a writable directory ({error.strerror or error})") from None


class RunLock:
    """``run_dir/run.lock``, created atomically (``O_EXCL``) and holding the owner's pid and host, so that a
    second run into the same directory is refused. A lock whose owner on this host is dead is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE

    def _stale(self, owner: dict) -> bool:
        if owner["host"] != socket.gethostname():
            return False
        if owner["pid"] == os.getpid():  # left by an earlier process with our pid (e.g. a restarted container)
            return True
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False

    def __enter__(self) -> None:
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = self.path.read_text()
                except FileNotFoundError:  # released meanwhile
                    continue
                try:
                    owner = json.loads(held)
                    stale = self._stale(owner)
                except (ValueError, KeyError, TypeError):
                    raise RunError(f"lock file {self.path} is unreadable ({held[:100]!r}); delete it if no run is "
                                   f"using {self.path.parent}") from None
                if not stale:
                    raise RunError(f"run_dir {self.path.parent} is in use by process {owner['pid']} on "
                                   f"{owner['host']} (lock file {self.path}): wait for that run to end or use "
                                   "another run_dir") from None
                warnings.warn(f"taking over {self.path} of process {owner['pid']}, which is no longer running",
                              stacklevel=2)
                if self.path.read_text() == held:  # narrows the race between two takers of one stale lock
                    self.path.unlink()
                continue
            except OSError as error:
                raise RunError(f"run_dir {self.path.parent} is not writable: cannot create {self.path} "
                               f"({error.strerror or error})") from None
            with os.fdopen(descriptor, "w") as f:
                f.write(me)
            return
        raise RunError(f"could not take the lock file {self.path}: other runs keep taking it")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _file_digest(path: str) -> str:
    """The sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _training_values(config: dict, data_digest: str | None) -> dict:
    """The dotted keys of ``config`` (a dict of :class:`Config`) that a resume must not change silently."""
    values = {key: value for key, value in _flatten(config).items()
              if not any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE_ON_RESUME)}
    if data_digest is not None:
        values[DATA_DIGEST] = data_digest
    return values


def check_resume_config(config: Config, data_digest: str, checkpoint: Path, state: dict, run_dir: Path) -> None:
    """Refuse to resume ``checkpoint`` under a training config that differs from the one it was written with,
    unless ``resume_changed: allow``; then the change is recorded in ``config_changes.jsonl``."""
    recorded = state.get("config")
    if recorded is None:  # a checkpoint from before the config was stored in it
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    old = _training_values(recorded, state.get("data_digest"))
    new = _training_values(dataclasses.asdict(config), data_digest if DATA_DIGEST in old else None)
    changed = {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)}
    if not changed:
        return
    listing = "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changed.items())
    if config.resume_changed != "allow":
        raise RunError(f"run_dir {run_dir}: its checkpoint {checkpoint.name} was trained with a different config "
                       f"({listing}); to resume with the new values set resume_changed=allow (osft train "
                       "--allow-config-change), or use another run_dir")
    with open(run_dir / CHANGES_FILE, "a") as f:
        f.write(json.dumps({"step": state["step"], "checkpoint": checkpoint.name, "changes": changed}) + "\n")
    warnings.warn(f"resuming {checkpoint} with a changed config ({listing}); recorded in {run_dir / CHANGES_FILE}",
                  stacklevel=2)


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
    _check_writable(run_dir, "run_dir")
    with RunLock(run_dir):
        _run(config, run_dir, progress)
    return run_dir


def _run(config: Config, run_dir: Path, progress: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = Checkpoints(run_dir, config.keep_last)
    if config.keep_last:
        _check_writable(checkpoints.root, "the checkpoint directory (keep_last > 0)")
    found = checkpoints.load_latest() if config.resume == "auto" else None
    if found is None and any(p.suffix != ".tmp" for p in checkpoints.root.glob("step-*")):
        reason = "none of them loads" if config.resume == "auto" else "resume: never"
        raise RunError(f"run_dir {run_dir} holds checkpoints of an earlier run ({reason}); a fresh run must not "
                       f"mix with them: use another run_dir, or delete {checkpoints.root} to start afresh there")
    rows = load_rows(config.data.train, [getattr(config.data, c) for c in RECIPES[config.recipe].columns])
    data_digest = _file_digest(config.data.train)
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
                # one fused norm over the weights, one sync: an update (e.g. a huge lr times weight decay) can
                # overflow them with finite gradients
                if not torch.isfinite(torch.nn.utils.get_total_norm(lm.model.parameters())):
                    raise FloatingPointError(f"step {step + 1}: the weights are not finite after the update (lr "
                                             f"{lr:g}); stopping (last checkpoint: {checkpoints.latest()})")
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
                    checkpoints.save(lm, optimizer, step, position, rollout_tokens, config, data_digest)
                    save_due = False
    finally:
        log.close()
