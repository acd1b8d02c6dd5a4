"""The run directory's state: its lock, its checkpoints, the metrics log rewritten on resume, and the
check that a resume keeps the training config.

One run at a time owns a run directory (``run.lock``). ``resume: auto`` continues from the newest
intact checkpoint and refuses a training config that differs from the checkpoint's (keys in
``FREE_ON_RESUME`` excepted) unless ``resume_changed: allow``, which applies the new values and
records them in ``config_changes.jsonl``. A fresh run refuses a directory holding checkpoints.
"""
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open

from .config import Config
from .distributed import Ranks
from .model import CausalLM

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
LOCK_FILE = "run.lock"
CHANGES_FILE = "config_changes.jsonl"
# keys that change how a run is logged, evaluated, checkpointed or computed, not what it trains; a
# resume may change them freely (a key ending in "." covers its section)
FREE_ON_RESUME = ("run_dir", "resume", "resume_changed", "log_every", "tensorboard", "save_every", "keep_last",
                  "eval.", "model.gradient_checkpointing", "model.backend", "model.attn_implementation",
                  "model.padding_free",
                  "optim.micro_batch_tokens", "rollout.engine", "rollout.autocast", "rollout.batch_size",
                  "rollout.vllm_memory_fraction")
DATA_DIGEST = "data.train (sha256 of the file)"


class RunError(RuntimeError):
    """A run that cannot start as asked, naming the file, directory or key concerned."""



class Checkpoints:
    """``run_dir/checkpoints/step-NNNNNN``: the whole model's safetensors weights and tokenizer (loadable
    with ``from_pretrained``), the optimizer state as a ``torch.distributed.checkpoint`` directory
    (``optimizer/``, written by every rank for its shards and loadable onto any number of processes),
    and the trainer state: step and data position (the schedule follows from the step), every rank's
    RNG states, the run's config and its data file's digest (a resume compares them with its own).
    Written to a temporary directory and renamed by the main rank, so a killed run never leaves a
    partial checkpoint; the last ``keep_last`` (by step number) are kept (with 0, none is written)."""

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
                if "optimizer" not in state and not (path / OPTIMIZER_DIR / ".metadata").is_file():
                    raise FileNotFoundError(f"no {OPTIMIZER_DIR}/.metadata (the optimizer state)")
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
             data_digest: str, ranks: Ranks = Ranks()) -> Path:
        """Every rank calls it (the weights are gathered and the optimizer shards written collectively)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        final = self.root / f"step-{step:06d}"
        temporary = self.root / f"step-{step:06d}.tmp"
        if ranks.main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        ranks.barrier()  # the directory exists before any rank writes into it
        weights = get_model_state_dict(lm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
            if lm.sharded else None
        dcp.save(optimizer_state(lm, optimizer), checkpoint_id=temporary / OPTIMIZER_DIR)
        rng = ranks.gather(_rng_state())
        if ranks.main:
            lm.model.save_pretrained(temporary, state_dict=weights, safe_serialization=True)
            lm.tokenizer.save_pretrained(temporary)
            torch.save({"step": step, "position": position, "rollout_tokens": rollout_tokens, "rng": rng,
                        "config": dataclasses.asdict(config), "data_digest": data_digest}, temporary / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            temporary.rename(final)
            for old in self.all()[:-self.keep_last]:
                shutil.rmtree(old)
        ranks.barrier()  # no rank moves on before the checkpoint is complete
        return final

    @staticmethod
    def restore(path: Path, state: dict, lm: CausalLM, optimizer, ranks: Ranks = Ranks()) -> tuple[int, int, int]:
        """``(step, position, rollout_tokens)`` of the checkpoint at ``path`` with trainer ``state``; restores
        the optimizer (resharded onto these ranks) and this rank's RNGs: those it saved, or with another
        number of processes than the run that saved them, the main rank's (sampling then differs from an
        uninterrupted run; the offline recipes do not sample)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if "optimizer" in state:  # a single-process checkpoint of the earlier format
            optimizer.load_state_dict(state["optimizer"])
        else:
            loaded = optimizer_state(lm, optimizer)
            dcp.load(loaded, checkpoint_id=path / OPTIMIZER_DIR)
            set_optimizer_state_dict(lm.model, optimizer, loaded)
        rng = state["rng"]
        if isinstance(rng, list):
            rng = rng[ranks.rank] if len(rng) == ranks.size else rng[0]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return state["step"], state["position"], state["rollout_tokens"]


def optimizer_state(lm: CausalLM, optimizer) -> dict:
    """The optimizer's state keyed by parameter names, this rank's shards of it (what
    ``torch.distributed.checkpoint`` saves and reshards on load); states not yet created are zeros."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(lm.model, optimizer)


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


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


def check_writable(directory: Path, what: str) -> None:
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


def file_digest(path: str) -> str:
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
