"""The command line's machinery: a parser whose errors are one line, flags generated from the
Config dataclass, the checks of a model's path and of --eval-fs, the `compare` subcommand, and
the one line (and exit code) of a command stopped by bad input, another process, Ctrl-C,
SIGTERM or a full disk.

The rest may call: OneLineParser, add_config_flags, eval_groups, check_model_source, compare, HUB_ID,
Invocation, Terminated, terminated, stopped.
"""
import argparse
import dataclasses
import errno
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from support import UsageError
from support.reports import compare_runs
from support.team import PeerFailed, Team

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


class Terminated(BaseException):
    """SIGTERM, as a cluster's scheduler sends it: stops the run as Ctrl-C does (a BaseException,
    like KeyboardInterrupt, so no `except Exception` on the way swallows it)."""


def terminated(signum, frame):
    raise Terminated()


@dataclass
class Invocation:
    """What a command's last line needs to know: its words, its team (the main process speaks),
    and, for a run of the loop, its run directory and whether it resumed; for the audit, that."""
    argv: list[str]
    team: Team = field(default_factory=Team)
    run_dir: Path | None = None
    resumed: bool = False
    auditing: bool = False

    def joined(self, team: Team) -> Team:
        self.team = team
        return team


def where_it_stopped(now: Invocation, action: str) -> str:
    """What is saved, read from the run directory itself, and how to go on from it."""
    try:
        last = json.loads((now.run_dir / "progress.json").read_text())["last_completed_cycle"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"before any cycle completed; {action}run the same command to start again"
    resume = [] if now.resumed else ["--resume"]
    return (f"after cycle {last}, saved in {now.run_dir}; {action}continue with: "
            f"python intrinsic_self_improvement.py {shlex.join(now.argv + resume)}")


def stopped(stop: BaseException, now: Invocation) -> int:
    """The exit code of a command stopped by `stop`, and its one line on stderr (said once, by the
    main process of a team); what is not a stop of its own kind is raised again."""
    say = (lambda line: print(line, file=sys.stderr)) if now.team.main else (lambda line: None)
    kept = "the audit keeps the items it has written: run the same command to continue"
    if isinstance(stop, UsageError):  # the same on every process of a team (see Team.together)
        say(f"error: {stop}")
        return 2
    if isinstance(stop, PeerFailed):
        say(f"error: another process of this run failed (its message is above); "
            f"{kept if now.auditing else 'stopped ' + where_it_stopped(now, '')}")
        return 1
    if isinstance(stop, (KeyboardInterrupt, Terminated)):
        code, by = (130, "Ctrl-C") if isinstance(stop, KeyboardInterrupt) else (143, "SIGTERM")
        if now.auditing:
            say(f"stopped by {by}; {kept}")
        else:
            say(f"stopped by {by} {where_it_stopped(now, '') if now.run_dir else 'before the run began'}")
        return code
    if isinstance(stop, OSError) and stop.errno in (errno.ENOSPC, errno.EDQUOT) and now.run_dir:
        writing = f" (writing {stop.filename})" if stop.filename else ""
        print(f"error: no space left on the device{writing}; stopped "
              f"{where_it_stopped(now, 'free some, then ')}", file=sys.stderr)
        return 2
    raise stop
