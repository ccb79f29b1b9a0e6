"""NL2Bash as packaged by InterCode (300 items over five file systems), executed in the sandbox.

Each command, gold or generated, runs in a fresh copy of its group's file system (see
support/sandbox.py). The execution reward follows InterCode's environment code: file-system
changes, the contents of changed files, and TF-IDF similarity of the output. NLC2CMD (utilities
and flags, parsed with bashlex: support/bash_structure.py) and whitespace-normalised exact match
are reported beside it.

    from support.nl2bash import Evaluator, load_items, summarize
    items = load_items(limit=60)
    with Evaluator(items) as evaluator:
        results = evaluator.score(commands)        # one command per item, in order
    print(summarize(results, items))

    # self-check: score the gold commands against themselves, print timings
    python -m support.nl2bash --limit 60

Needs the PyPI package icalfa==0.3.6 (installed with --no-deps; only its data files are read),
bashlex, scikit-learn, scipy, and the sandbox's bubblewrap.

The rest may call: load_items, evenly_spread, Evaluator, score_in_sandbox, summarize, aggregate, spearman, nlc2cmd_score,
intercode_reward, exact_match, GROUPS; and command_structure and PARSE_TIMEOUT_S, which are
support.bash_structure's, offered here too.
"""
import argparse
import dataclasses
import importlib.metadata
import json
import math
import re
import sys
import time
from pathlib import Path

from support.bash_structure import PARSE_TIMEOUT_S, command_structure  # noqa: F401  (offered here too)
from support.sandbox import Execution, Sandbox, SandboxUnavailable

GROUPS = (1, 2, 3, 4, 5)  # nl2bash_fs_{group}.json and setup_nl2b_fs_{group}.sh in icalfa
ICALFA_ASSETS = "icalfa/assets"


OUTPUT_KEPT_CHARS = 1000  # output kept per result, for reading; the reward sees all of it


def icalfa_asset(relative: str) -> Path:
    """Path of a data file shipped in icalfa, found through its metadata: importing icalfa
    itself fails without its declared dependencies, which the evaluation does not need."""
    try:
        path = Path(importlib.metadata.distribution("icalfa").locate_file(f"{ICALFA_ASSETS}/{relative}"))
    except importlib.metadata.PackageNotFoundError:
        raise SandboxUnavailable("icalfa is not installed: pip install --no-deps icalfa==0.3.6") from None
    if not path.is_file():
        raise SandboxUnavailable(f"icalfa lacks {ICALFA_ASSETS}/{relative}: install icalfa==0.3.6")
    return path


def load_items(limit: int | None = None, groups: tuple[int, ...] = GROUPS) -> list[dict]:
    """The benchmark items of the given file-system groups in a fixed order (group by group, file
    order within a group), each {"id", "group", "query", "gold", "gold2", "difficulty"}.
    `limit` takes an evenly spread subset (positions floor(i * n / limit)), the same every call,
    so quick runs compare across cycles and cover every group in proportion."""
    if not groups or any(g not in GROUPS for g in groups):
        raise ValueError(f"file systems are numbered {GROUPS[0]} to {GROUPS[-1]}, got {list(groups)}")
    items = []
    for group in sorted(set(groups)):
        records = json.loads(icalfa_asset(f"datasets/nl2bash_fs_{group}.json").read_text())
        for index, record in enumerate(records):
            items.append({"id": f"fs{group}-{index:03d}", "group": group, "query": record["query"],
                          "gold": record["gold"], "gold2": record["gold2"], "difficulty": record["difficulty"]})
    return evenly_spread(items, limit)


def evenly_spread(items: list, limit: int | None) -> list:
    """`limit` of the items at positions floor(i * n / limit), the same every call (all of them for
    None); ValueError for a limit outside 1..n."""
    if limit is None or limit == len(items):
        return items
    if not 1 <= limit <= len(items):
        raise ValueError(f"the limit must be between 1 and the {len(items)} items there are, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


def normalize_command(command: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped (inside quotes too: a model that
    changes the spacing of a quoted string rarely means something else)."""
    return " ".join(command.split())


def exact_match(command: str, references: list[str]) -> bool:
    """The command equals one of the references after whitespace normalisation."""
    return normalize_command(command) in {normalize_command(r) for r in references}


def structure_similarity(prediction: list, reference: list) -> float:
    """NLC2CMD S(p) for one reference: utilities compared position by position, flags by
    (2|Fc & Fp| - |Fc | Fp|) / max(1, |Fc|, |Fp|), mismatched or missing utilities cost 1."""
    length = max(len(prediction), len(reference))
    if length == 0:
        return 1.0
    total = 0.0
    for i in range(length):
        utility_p, flags_p = prediction[i] if i < len(prediction) else (None, frozenset())
        utility_c, flags_c = reference[i] if i < len(reference) else (None, frozenset())
        if utility_p is None or utility_p != utility_c:
            total -= 1.0
            continue
        if flags_p or flags_c:
            flag_score = (2 * len(flags_c & flags_p) - len(flags_c | flags_p)) / max(1, len(flags_c), len(flags_p))
        else:
            flag_score = 1.0
        total += (1.0 + flag_score) / 2
    return total / length


def nlc2cmd_score(prediction: str, references: list[str]) -> float:
    """NLC2CMD (NeurIPS 2020) score in [-1, 1], the max over the references. A prediction that
    bashlex cannot parse scores -1 (the metric has no utilities to compare); a reference that
    bashlex cannot parse (e.g. `time ...`) counts only by exact, whitespace-normalised equality.
    Flags follow an approximation of the competition's parser: bundled short flags split,
    option values dropped, find's predicates kept whole, find -exec and xargs commands counted."""
    if exact_match(prediction, references):
        return 1.0
    predicted = command_structure(prediction)
    if predicted is None:
        return -1.0
    scores = [structure_similarity(predicted, ref) for ref in map(command_structure, references) if ref is not None]
    return max(scores, default=-1.0)


def output_similarity(output: str, reference: str) -> float:
    """Cosine of the TF-IDF vectors of two outputs (scikit-learn defaults, as InterCode); exact
    equality (1 or 0) when neither has a token of two or more word characters."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        tfidf = TfidfVectorizer().fit_transform([output, reference])
    except ValueError:  # empty vocabulary
        return 1.0 if output == reference else 0.0
    return float((tfidf @ tfidf.T)[0, 1])


def reward_parts(gold_run: Execution, cand_run: Execution) -> dict:
    """InterCode's three parts: p1 file-system changes, p2 contents of the changed paths both
    runs added or modified, p3 output similarity."""
    mismatched = len(gold_run.changes ^ cand_run.changes)
    p1 = round(0.33 * (1 - math.erf(mismatched)), 2)
    common = [path for path, kind in gold_run.changes & cand_run.changes if kind != "deleted"]
    if common:
        same = sum(gold_run.signatures[path] == cand_run.signatures[path] for path in common)
        p2 = 0.33 * same / len(common)
    else:
        p2 = 0.33
    p3 = round(0.33 * output_similarity(cand_run.output, gold_run.output), 2)
    return {"p1": p1, "p2": p2, "p3": p3}


def total_reward(parts: dict) -> float:
    """0.01 + p1 + p2 + p3, in [0.01, 1]; 1 means the candidate did what the gold did."""
    return round(0.01 + parts["p1"] + parts["p2"] + parts["p3"], 6)


def intercode_reward(gold_run: Execution, cand_run: Execution) -> float:
    """InterCode's execution reward of a candidate run against the gold run."""
    return total_reward(reward_parts(gold_run, cand_run))


def is_success(reward: float) -> bool:
    """Reward 1 up to float rounding (0.01 + 0.33 * 3 is not exactly 1 in floats)."""
    return math.isclose(reward, 1.0, abs_tol=1e-6)


def spearman(xs, ys) -> float | None:
    """Spearman rank correlation; None when undefined (fewer than 2 points, constant input)."""
    from scipy.stats import spearmanr

    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs equal lengths, got {len(xs)} and {len(ys)}")
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    value = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(value) else value


def aggregate(results: list[dict]) -> dict:
    """Counts and means of one set of per-item results."""
    n = len(results)

    def mean(key):
        return sum(float(r[key]) for r in results) / n if n else None
    return {"n": n, "success_rate": mean("success"), "mean_reward": mean("reward"),
            "nlc2cmd": mean("nlc2cmd"), "exact_match": mean("exact")}


def score_in_sandbox(items: list[dict], commands: list[str], workers: int, team, setups: dict | None = None
                     ) -> list[dict]:
    """Each item's command scored against its gold command and against doing nothing, in a sandbox
    built afresh (gold outputs of time-relative queries, `find -mmin`, age), of the benchmark's
    file systems or `setups` (Evaluator's). Each process of a `team` scores its share; a sandbox
    missing on one process stops all (SandboxUnavailable)."""
    def execute(share: list[dict], mine: list[str]) -> list[dict]:
        with Evaluator(share, setups, workers=workers) as evaluator:
            return evaluator.score(mine, against_nothing=True)
    return team.spread(lambda share, mine: team.together(lambda: execute(share, mine), SandboxUnavailable),
                       items, commands)


def summarize(results: list[dict], items: list[dict]) -> dict:
    """{"n", "success_rate", "mean_reward", "nlc2cmd", "exact_match", "per_difficulty":
    {difficulty: same keys}}; results and items in the same order."""
    if len(results) != len(items):
        raise ValueError(f"{len(results)} results for {len(items)} items")
    by_difficulty = {}
    for result, item in zip(results, items):
        by_difficulty.setdefault(item["difficulty"], []).append(result)
    return {**aggregate(results),
            "per_difficulty": {d: aggregate(rows) for d, rows in sorted(by_difficulty.items())}}


SHELL_COMPLAINT = re.compile(r"^(?:/bin/)?(?:ba)?sh: (?:-c: )?line \d+: .*$\n?", re.M)
NOT_FOUND_LINE = re.compile(r"command not found|^bash: line \d+: \S+: No such file or directory$", re.M)


def without_shell_complaints(run):
    """The run with bash's own error lines ("bash: line 1: X: command not found", syntax errors)
    taken out of its output: what is left is what the programs it ran printed."""
    return dataclasses.replace(run, output=SHELL_COMPLAINT.sub("", run.output))


class Evaluator(Sandbox):
    """The benchmark's file systems (InterCode's setup scripts, one per group), each gold command
    run once; then scores any number of candidate lists against the gold runs. `setups`: other
    file systems, by the items' group (a task domain's: {"domain": (script, None)}); the
    benchmark's by default. Other arguments as Sandbox's. After construction: build_seconds,
    gold_seconds, gold_runs (one Execution per item)."""

    def __init__(self, items: list[dict], setups: dict | None = None, **sandbox):
        self.items = list(items)
        if setups is None:
            scripts = {g: icalfa_asset(f"docker/setup_nl2b_fs_{g}.sh") for g in sorted({i["group"] for i in items})}
            # group 5's `#!/bin/sh` is BusyBox in InterCode, whose echo interprets -e like bash's,
            # not dash's: every script runs with bash
            setups = {g: (path.read_text(), path.name) for g, path in scripts.items()}
        super().__init__(setups, **sandbox)
        try:
            started = time.monotonic()
            self.gold_runs = self.run_items([item["gold"] for item in self.items])
            self.gold_seconds = time.monotonic() - started
        except BaseException:
            self.close()
            raise

    def run_items(self, commands: list[str]) -> list[Execution]:
        """One command per item, in item order."""
        return self.run_all([item["group"] for item in self.items], commands)

    def score(self, commands: list[str], against_nothing: bool = False) -> list[dict]:
        """One generated command per item (same order as items). Per item: id, command, reward,
        success (reward 1), nlc2cmd, exact, timed_out, truncated, exit_code, p1, p2, p3, seconds,
        and the first OUTPUT_KEPT_CHARS of the output. With `against_nothing`, the do-nothing
        command `true` runs too, and each item gets beats_reward (the reward of the output
        without bash's own complaints), nothing_reward, and trivial_item (doing nothing
        succeeds)."""
        if len(commands) != len(self.items):
            raise ValueError(f"{len(commands)} commands for {len(self.items)} items")
        runs = self.run_items(commands)
        nothing = self.run_items(["true"] * len(commands)) if against_nothing else [None] * len(commands)
        results = []
        for item, command, gold_run, run, idle in zip(self.items, commands, self.gold_runs, runs, nothing):
            parts = reward_parts(gold_run, run)
            reward = total_reward(parts)
            references = [item["gold"], item["gold2"]]
            results.append({"id": item["id"], "command": command, "reward": reward, "success": is_success(reward),
                            "nlc2cmd": nlc2cmd_score(command, references), "exact": exact_match(command, references),
                            "timed_out": run.timed_out, "truncated": run.truncated, "exit_code": run.exit_code,
                            **parts, "seconds": run.seconds, "output": run.output[:OUTPUT_KEPT_CHARS]})
            if idle is not None:
                nothing_reward = intercode_reward(gold_run, idle)
                results[-1] |= {"beats_reward": intercode_reward(gold_run, without_shell_complaints(run)),
                                "nothing_reward": nothing_reward, "trivial_item": is_success(nothing_reward),
                                "gold_broken": gold_run.exit_code == 127 or bool(NOT_FOUND_LINE.search(gold_run.output))}
        return results


def main(argv: list[str] | None = None) -> int:
    """Score the gold commands against themselves: a check of the sandbox and of which items
    are not reproducible (clock, processes, host state), with timings."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--limit", type=int, default=None, help="evenly spread subset of the 300 items")
    parser.add_argument("--workers", type=int, default=2, help="commands run in parallel")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per command")
    args = parser.parse_args(argv)
    try:
        items = load_items(args.limit)
    except ValueError as error:
        parser.error(f"--limit: {error}")
    try:
        evaluator = Evaluator(items, workers=args.workers, timeout_s=args.timeout)
    except SandboxUnavailable as error:
        print(f"sandbox unavailable: {error}", file=sys.stderr)
        return 2
    with evaluator:
        print(f"built {len(evaluator.trees)} file systems in {evaluator.build_seconds:.2f} s; "
              f"ran {len(items)} gold commands in {evaluator.gold_seconds:.2f} s")
        started = time.monotonic()
        results = evaluator.score([item["gold"] for item in items])
        print(f"scored {len(items)} gold commands in {time.monotonic() - started:.2f} s (workers {args.workers})")
    print(json.dumps(summarize(results, items), indent=1))
    unstable = [f"{r['id']} ({r['reward']:.2f}): {r['command']}" for r in results if not r["success"]]
    print(f"gold is not a success against itself on {len(unstable)} items", *unstable, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
