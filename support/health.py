"""A batch's health, measured without any label: how varied its commands are, how much of each
command is copied from its task or restates it, how many candidates hold no command; and when
those say the batch has collapsed (COLLAPSE). What the loop prints, records per batch and stops on
with --stop-on-collapse.

The rest may call: words, distinct_n, copy_rate, restates_task, generation_health, COLLAPSE,
collapse_reasons.
"""
import re

WORD = re.compile(r"[a-z0-9]+(?:[./:,-][a-z0-9]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def distinct_n(token_lists: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams over a set of commands (0 when there are none)."""
    grams = [tuple(tokens[k:k + n]) for tokens in token_lists for k in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def copy_rate(task: str, command: str) -> float:
    """Share of a command's tokens that appear verbatim in its task: a copied IP or port makes
    reconstruction easy whatever the flags around it are."""
    task_tokens = {t.strip(".,;:!?\"'()").lower() for t in task.split()}
    tokens = command.split()
    return sum(t.lower() in task_tokens for t in tokens) / len(tokens) if tokens else 0.0


PROSE_WORD = re.compile(r"[A-Za-z]+[.,;:!?]?")
TASK_STOPWORDS = frozenset("a an the in of to for on and or with from by at all any each every that "
                           "this is are be it its as into than".split())


def restates_task(task: str, command: str) -> bool:
    """The command is a sentence about its task, not a command: four or more tokens, at least
    three in four of them plain words ("You can use the nmap command to scan ports 22,80 on
    10.0.0.1"), sharing at least two content words with the task."""
    tokens = command.split()
    if len(tokens) < 4 or sum(bool(PROSE_WORD.fullmatch(t)) for t in tokens) < 0.75 * len(tokens):
        return False
    shared = (set(words(task)) - TASK_STOPWORDS) & set(words(command))
    return len(shared) >= 2


def generation_health(records: list[dict]) -> dict:
    """Collapse measures over a batch: over its usable commands, and the share of candidates
    that are no command at all."""
    usable = [r for r in records if r["usable"]]
    tokens = [r["command"].split() for r in usable]
    by_task = {}
    for r in usable:
        by_task.setdefault(r["task"], []).append(r["command"])
    duplicates = sum(commands.count(c) > 1 for commands in by_task.values() for c in commands)
    mean = lambda values: round(sum(values) / len(values), 4) if values else 0.0  # noqa: E731
    return {"distinct_1": round(distinct_n(tokens, 1), 4), "distinct_2": round(distinct_n(tokens, 2), 4),
            "duplicate_rate": round(duplicates / len(usable), 4) if usable else 0.0,
            "copy_rate": mean([copy_rate(r["task"], r["command"]) for r in usable]),
            "restate_rate": mean([restates_task(r["task"], r["command"]) for r in usable]),
            "no_command_rate": mean([not r["usable"] for r in records]),
            "mean_command_tokens": mean([len(t) for t in tokens])}


# When a batch has collapsed, by its health alone (no label, no benchmark): each measure and the
# value past which it says so, set from the published loop's runs (RESULTS.md sections 1 and 3;
# docs/signals.md has the figures), where the untrained model's batches and the collapsed ones lie
# on either side with room. Pentest collapsed into restating the task ("You can use the nmap
# command to ...", every candidate by cycle 5; untrained bash batches 0.16-0.19); bash into the
# same `ls` of the task's path for every candidate of a task (distinct-2 0.74-0.85 untrained,
# 0.40-0.48 from cycle 8); no command at all is the third way down (untrained batches: at most
# 0.35). The copy rate is shown, not used: a right pentest command copies the task's address and
# ports (`nmap -p 22,80 10.0.0.1`: 0.5), as the restated task does.
COLLAPSE = {"restate_rate": (">=", 0.5), "no_command_rate": (">=", 0.6), "distinct_2": ("<", 0.5)}


def collapse_reasons(health: dict) -> list[str]:
    """The health measures of a batch past their COLLAPSE limits, as 'name value op limit'."""
    reasons = []
    for name, (op, limit) in COLLAPSE.items():
        value = health.get(name)
        if value is not None and (value >= limit if op == ">=" else value < limit):
            reasons.append(f"{name} {value:.2f} {op} {limit}")
    return reasons
