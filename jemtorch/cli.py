"""The ``jem`` command.

    jem train [--dataset digits] [--model cnn] [--config FILE] [--any-config-flag VALUE ...]
    jem train --resume RUN_DIR [--epochs N ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import add_config_arguments, resolve_config
from .data import DatasetError

USER_ERRORS = (ValueError, DatasetError, CheckpointError, FileNotFoundError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, non-zero exit
        self.exit(2, f"jem: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jem", description="Train and use Joint Energy-based Models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a JEM (default: digits, small CNN)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--config", help="JSON or TOML file of config entries (CLI flags override it)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that already has a run")
    add_config_arguments(t)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .train import CHECKPOINT, TrainingDiverged, train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "overwrite")}
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not (run_dir / CHECKPOINT).is_file() or not cfg_path.is_file():
            raise FileNotFoundError(f"nothing to resume in {run_dir}: expected {run_dir / CHECKPOINT} and config.json")
        base = json.loads(cfg_path.read_text())
        base["out"] = str(run_dir)
        cfg = resolve_config(overrides, args.config, base)
    else:
        cfg = resolve_config(overrides, args.config)
        if (cfg.run_dir / CHECKPOINT).exists() or (cfg.run_dir / "metrics.jsonl").exists():
            if not args.overwrite:
                raise ValueError(f"{cfg.run_dir} already holds a run; use --resume {cfg.run_dir}, --overwrite, "
                                 f"or another --out/--name")
            for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json", "samples_uncond.png",
                         "samples_cond.png"):
                (cfg.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(cfg.run_dir / "samples", ignore_errors=True)
    try:
        summary = train(cfg, resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"jem: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoint saved. Continue with: jem train --resume {cfg.run_dir}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    print(f"run directory: {cfg.run_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train}[args.command](args)
    except USER_ERRORS as e:
        print(f"jem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
