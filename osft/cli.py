"""The ``osft`` command (also ``python -m osft``)::

    osft train CONFIG.yaml [key.sub=value ...] [--no-progress] [--allow-config-change]
    osft score CONFIG.yaml --output FILE.parquet [--temperature T] [key.sub=value ...]
    osft eval CONFIG.yaml [key.sub=value ...]      (model.path on eval.data; written to run_dir/eval.jsonl)
    osft demo [--model smollm2-135m] [--ablation] ...  (OSFT vs GRPO on the built-in task; see osft.demo)
"""
import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"osft {command}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    if command == "train":
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser.add_argument("--allow-config-change", action="store_true",
                            help="resume even if the training config differs from the checkpoint's, applying the "
                                 "new values (resume_changed=allow)")
    elif command == "score":
        parser.add_argument("--output", required=True, help="the .parquet file to write")
        parser.add_argument("--temperature", type=float, default=1.0, help="the behavior policy's temperature")
    return parser


def run_command() -> None:
    """The ``osft`` console script and ``python -m osft``: :func:`main`, then exit with its code. A process of
    a torchrun launch leaves without the interpreter's teardown, once its output is flushed and its files
    are closed: with torch 2.13 such a process (gloo, FSDP2) now and then aborts in C++ destructors at
    interpreter exit ("terminate called without an active exception", no Python frame), after its work
    is done and its process group destroyed, which torchrun would report as a failed run."""
    from .distributed import launched_processes

    code = main()
    if launched_processes() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    # -h after a command reaches that command's parser
    parser = argparse.ArgumentParser(prog="osft", description="OSFT / SFT / PEAR / GRPO training on fused losses",
                                     add_help=False)
    parser.add_argument("command", choices=["train", "eval", "score", "demo"],
                        help="train: run config.recipe; eval: pass@k of model.path on eval.data; score: write "
                             "per-token response logprobs of data.train under model.path (PEAR's behavior "
                             "logprobs) into a parquet file; demo: OSFT vs GRPO from a packaged "
                             "pretrained model on the built-in math task")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    known, rest = parser.parse_known_args(argv)
    from .distributed import launched_processes

    if known.command == "demo" and launched_processes() > 1:
        print("osft: osft demo runs in one process; under torchrun use osft train, eval or score", file=sys.stderr)
        return 2
    if known.command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    args = _command_parser(known.command).parse_intermixed_args(rest)
    if getattr(args, "allow_config_change", False):
        args.overrides.append("resume_changed=allow")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"osft: bad config: {error}", file=sys.stderr)
        return 2
    from .data import DataError
    from .run_dir import RunError
    try:
        return _run(known.command, config, args)
    except ConfigError as error:
        print(f"osft: bad config: {error}", file=sys.stderr)
    except DataError as error:
        print(f"osft: bad data: {error}", file=sys.stderr)
    except RunError as error:
        print(f"osft: {error}", file=sys.stderr)
    return 2


def _run(command: str, config, args) -> int:
    """Runs ``command``; config, data and run-directory errors reach :func:`main` as exit code 2."""
    from .distributed import main_process

    if command == "eval":
        return _evaluate(config)
    if command == "score":
        from .scoring import score_file
        written = score_file(config, Path(args.output), temperature=args.temperature)
        if main_process():  # once under torchrun
            print(f"wrote {written}")
        return 0
    from .train import train
    run_dir = train(config, progress=not args.no_progress)
    if main_process():  # once under torchrun
        print(f"done: {run_dir}")
    return 0


def _evaluate(config) -> int:
    import json

    from .distributed import join_ranks
    from .evaluate import append_eval, evaluate, load_eval_rows
    from .model import default_device, load_causal_lm
    from .train import seed_everything

    if not config.eval.data:
        print("osft: bad config: eval.data is required for osft eval", file=sys.stderr)
        return 2
    with join_ranks() as ranks:  # under torchrun each process judges a share of the prompts
        seed_everything(config.seed + ranks.rank)
        lm = load_causal_lm(config.model, default_device())
        evaluation = evaluate(lm, config, load_eval_rows(config), ranks=ranks)
    if ranks.main:
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        append_eval(Path(config.run_dir) / "eval.jsonl", 0, evaluation)
        print(json.dumps(evaluation.metrics, indent=1))
    return 0
