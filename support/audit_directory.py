"""The audit's directory: what an audit has written so far, its figures written out (audit.json,
audit.png, the printed table), an audit read back for `audit --from`, and the paired change of
every signal from another audit (`--against`).

The rest may call: audited_so_far, write_figures, read_audit, read_candidates, write_changes.
"""
import json
from pathlib import Path

from support import UsageError
from support.audit import BEATS_NOTHING_MARGIN, audit_figures, audit_table, changes_table, paired_changes, plot_audit
from support.run_directory import read_jsonl, write_json


# what every candidate of audit_candidates.jsonl holds, with its type
CANDIDATE_FIELDS = {"item": str, "greedy": bool, "usable": bool, "signals": dict, "success": bool,
                    "reward": (int, float), "trivial_item": bool}


def candidate_problem(row) -> str | None:
    """What keeps a row of a candidates file from being a candidate; None when nothing does."""
    if not isinstance(row, dict):
        return "not an object"
    for name, kind in CANDIDATE_FIELDS.items():
        if name not in row:
            return f"no {name!r}"
        if not isinstance(row[name], kind):
            return f"its {name!r} is {row[name]!r}"
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in row["signals"].values()):
        return "a signal's value is not a number"
    return None


def check_candidates(path: Path, rows: list) -> list[dict]:
    """The rows of a candidates file, each checked to be a candidate; a one-line error naming the
    file and the first row that is not (a hand edit, another tool's row)."""
    for number, row in enumerate(rows, 1):
        problem = candidate_problem(row)
        if problem:
            raise UsageError(f"{path}: row {number} is not an audit candidate ({problem})")
    return rows


def audited_so_far(path: Path, items: list[dict], per_item: int) -> list[dict]:
    """The candidates an audit has written (whole chunks), checked against the items."""
    if not path.exists():
        return []
    try:
        rows = check_candidates(path, read_jsonl(path))
        ids = [r["item"] for r in rows[::per_item]]
        if len(rows) % per_item or ids != [item["id"] for item in items[:len(ids)]]:
            raise ValueError("its candidates are not the items' in order")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}: {err}); the audit cannot go "
                         f"on from it: remove it, or choose another --name") from None
    return rows


def write_figures(audit_dir: Path, rows: list[dict], settings: dict, meta: dict, *, rules: dict, keeps,
                  bootstrap: int, margin: float | None) -> dict:
    """audit.json, audit.png and the printed table, from the candidates (`margin` None: the
    default BEATS_NOTHING_MARGIN; `rules` and `keeps` as audit_figures takes them)."""
    figures = audit_figures(rows, rules=rules, keeps=keeps, threshold=settings["threshold"], bootstrap=bootstrap,
                            shellcheck_available=settings["shellcheck"], seed=settings["seed"],
                            margin=BEATS_NOTHING_MARGIN if margin is None else margin)
    figures["truth"] = "tools" if settings.get("eval") == "tools" else "execution"
    result = figures | {"settings": settings} | meta
    write_json(audit_dir / "audit.json", result)
    plot_audit(figures, audit_dir / "audit.png")
    print(audit_table(figures))
    print(f"wrote {audit_dir / 'audit.json'}, {audit_dir / 'audit.png'}", flush=True)
    return result


def read_audit(audit_dir: Path) -> tuple[dict, list[dict], dict]:
    """An audit's settings, candidates, and what its audit.json says of how it ran (machine,
    compute, wall time, complete); a one-line error where it cannot be read or is empty."""
    try:
        settings = json.loads((audit_dir / "audit_settings.json").read_text())
        rows = check_candidates(audit_dir / "audit_candidates.jsonl", read_jsonl(audit_dir / "audit_candidates.jsonl"))
        meta = json.loads((audit_dir / "audit.json").read_text()) if (audit_dir / "audit.json").exists() else {}
    except (OSError, ValueError) as err:
        raise UsageError(f"--from {audit_dir}: not a readable audit ({type(err).__name__}: {err})") from None
    if not rows:
        raise UsageError(f"--from {audit_dir}: the audit has no candidates yet")
    return settings, rows, {k: meta[k] for k in ("machine", "compute", "wall_s", "complete") if k in meta}


def read_candidates(audit_dir: str) -> list[dict]:
    """Another audit's candidates (for --against); a one-line error where they cannot be read."""
    path = Path(audit_dir) / "audit_candidates.jsonl"
    try:
        return check_candidates(path, read_jsonl(path))
    except (OSError, ValueError) as err:
        raise UsageError(f"--against {audit_dir}: not a readable audit ({err})") from None


def write_changes(audit_dir: Path, against: str, before: list[dict], rows: list[dict], *, bootstrap: int,
                  seed: int, margin: float | None) -> dict:
    """audit_changes.json and its table: each signal's change from the audit in `against` (its
    candidates `before`, the same items) to this one's, with paired bootstrap intervals."""
    changes = paired_changes(before, rows, bootstrap=bootstrap, seed=seed,
                             margin=BEATS_NOTHING_MARGIN if margin is None else margin)
    write_json(audit_dir / "audit_changes.json", changes | {"against": str(against)})
    print(changes_table(changes))
    print(f"wrote {audit_dir / 'audit_changes.json'}", flush=True)
    return changes
