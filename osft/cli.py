"""``osft train CONFIG.yaml [key.sub=value ...]`` (also ``python -m osft``)."""
import argparse
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osft", description="OSFT / SFT training with fused loss kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="run a recipe from a YAML config")
    train_parser.add_argument("config", help="YAML config file")
    train_parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"osft: bad config: {error}", file=sys.stderr)
        return 2
    from .train import train
    run_dir = train(config, progress=not args.no_progress)
    print(f"done: {run_dir}")
    return 0
