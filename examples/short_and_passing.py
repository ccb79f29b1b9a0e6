"""A label-free signal of one's own, for `--signal examples/short_and_passing.py:short_and_passing`
and `audit --signal ...` (docs/signals.md walks through it).

It prefers commands that ran cleanly in the domain's sandboxed file system and, among those, the
shorter: 1 + 1/words for a command that passed, 1/words for one that did not, None where the
model wrote no command. It asks for the execution result (`needs`) and keeps, per task, the
candidate it ranks first (`rule`, the default).
"""


def short_and_passing(candidates: list[dict]) -> list[float | None]:
    values = []
    for candidate in candidates:
        if not candidate["command"]:
            values.append(None)
            continue
        words = len(candidate["command"].split())
        values.append((1.0 if candidate["passed"] else 0.0) + 1.0 / words)
    return values


short_and_passing.needs = {"execution"}
short_and_passing.rule = "rank"
