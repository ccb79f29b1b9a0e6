"""The command line's machinery: a parser whose errors are one line, flags generated from the
Config dataclass, the checks of a model's path and of --eval-fs, and the `compare` subcommand.

The rest may call: OneLineParser, add_config_flags, eval_groups, check_model_source, compare, HUB_ID.
"""
import argparse
import dataclasses
import os
import re
from pathlib import Path

from support import UsageError
from support.reports import compare_runs

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # name or owner/name


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), exit code 2."""

    def error(self, message):
        # every process of a team meets the same bad flag; the main one says so
        main = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"error: {message} (see --help)\n" if main else None)


def add_config_flags(parser: argparse.ArgumentParser, config, names: list[str], defaults: dict = {}) -> None:
    """One flag per named field of the dataclass `config`, with its help, choices and default (or
    `defaults`')."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        f, flag = fields[name], "--" + name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {int: int, float: float}.get(f.type, str)
        parser.add_argument(flag, type=kind, default=defaults.get(name, f.default),
                            help=f.metadata["help"], choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else name.upper())


def eval_groups(cfg) -> tuple[int, ...]:
    """--eval-fs as numbers, e.g. "3,4,5" -> (3, 4, 5)."""
    try:
        groups = tuple(sorted({int(part) for part in cfg.eval_fs.split(",")}))
    except ValueError:
        groups = ()
    if not groups or not all(1 <= g <= 5 for g in groups):
        raise UsageError(
            f"--eval-fs must be file-system numbers from 1 to 5, comma-separated, got {cfg.eval_fs!r}"
        )
    return groups


def check_model_source(value: str, flag: str) -> None:
    """A local folder must hold a model (config.json); anything else must read as a hub id, which
    only loading can check (the hub may be unreachable)."""
    if not value.strip():
        raise UsageError(f"{flag} must not be empty")
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value}: the folder holds no model (no config.json)")
    elif path.exists():
        raise UsageError(f"{flag} {value}: a file; give the model's folder or a hub id")
    elif not HUB_ID.fullmatch(value) or ".." in value:
        raise UsageError(f"{flag} {value}: no such folder")


def compare(argv: list[str], config) -> None:
    """`compare RUN_DIR ...`: runs side by side, a table and one plot."""
    parser = OneLineParser(prog="intrinsic_self_improvement.py compare",
                           description="Compare runs side by side: a table and one plot.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--plot", default="output/comparison.png", help="where to write the plot")
    parser.add_argument("--eval-fs", default=None,
                        help="NL2Bash figures over these file systems only, e.g. 3,4,5")
    parser.add_argument("--baseline", default=None, metavar="RUN_DIR",
                        help="the run whose eval_cycle_0.jsonl is the untrained model's evaluation "
                        "(default: the first run given that has one)")
    args = parser.parse_args(argv)
    groups = None if args.eval_fs is None else eval_groups(config(eval_fs=args.eval_fs))
    print(compare_runs(args.run_dirs, Path(args.plot), groups, args.baseline))
