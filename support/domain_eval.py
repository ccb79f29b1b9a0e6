"""Known answers in a task domain: its templates' gold commands (labels), checked and used.

A gold command is a label. It feeds the evaluation in the domain (`--eval domain`) and the
oracle arm (`--select oracle`), both named as using labels, and never a signal called label-free.

Every gold must do something in the domain's file system, for every task its template makes:
run in a fresh copy of the file system, it passes the execution check (the script's
execution_verdict) and does what doing nothing (`true`) does not. check_golds runs every
instantiation of every template and names those that fail.

The held-out set (held_out_items) is about 150 of the domain's tasks, the same for every run and
seed, that the loop never draws (held_out_texts): `--eval domain` decodes a command for each
greedily and scores it against its gold as the NL2Bash evaluation does.

`audit --eval tools` audits the signals on a domain without golds (pentest) against its real
tools' verdict, on tool_items.

The rest may call: instantiations, check_golds, held_out_items, held_out_texts, tool_items.
"""
import itertools

from support.tasks import SLOT_PATTERN, fill, template_slots


def instantiations(template: dict, slots: dict) -> list[dict]:
    """Every assignment of values to the template's slots (its own values where it has them; in
    the order of its slots, then of their values)."""
    names, slots = sorted(set(SLOT_PATTERN.findall(template["task"]))), template_slots(template, slots)
    return [dict(zip(names, values)) for values in itertools.product(*(slots[name] for name in names))]


def check_golds(domain: dict, sandbox, verdict, reward) -> list[dict]:
    """Every template's gold run for every instantiation, against doing nothing: one entry per
    failure ({"task", "gold", "why"}), empty when every gold does something. `verdict(run)` is the
    execution check ("passed" or why not); `reward(gold_run, run)` the evaluation's reward (1 when
    a run did what the gold did)."""
    slots = domain.get("slots", {})
    cases = [(fill(t["task"], values), fill(t["gold"], values))
             for t in domain["templates"] if "gold" in t for values in instantiations(t, slots)]
    runs = sandbox.run_all(["domain"] * len(cases), [gold for _, gold in cases])
    nothing = sandbox.run_all(["domain"], ["true"])[0]
    failures = []
    for (task, gold), run in zip(cases, runs):
        why = verdict(run)
        if why == "passed" and reward(run, nothing) >= 1 - 1e-6:
            why = "does what doing nothing does"
        if why != "passed":
            failures.append({"task": task, "gold": gold, "why": why})
    return failures


def drawn_in_turn(domain: dict, templates: list[dict], n: int, label: str, room) -> list[tuple[dict, dict]]:
    """n of the templates' tasks as (template, slot values): one more from each template in turn,
    at most room(its number of tasks) from each, until n are drawn or none has room; drawn with a
    seed of the domain's name and `label` alone, so the same for every run and every --seed."""
    import random
    rng = random.Random(f"{domain.get('name', '')}:{label}")
    options = [instantiations(t, domain.get("slots", {})) for t in templates]
    rooms = [room(len(o)) for o in options]
    counts = [0] * len(templates)
    while sum(counts) < n and any(c < r for c, r in zip(counts, rooms)):
        for k in range(len(templates)):
            if counts[k] < rooms[k] and sum(counts) < n:
                counts[k] += 1
    return [(template, values) for template, choices, count in zip(templates, options, counts)
            for values in rng.sample(choices, count)]


def held_out_items(domain: dict, n: int = 150) -> list[dict]:
    """The domain's held-out evaluation set: n tasks (fewer where the domain is small), every
    template with a gold represented (one from each in turn, never more than half of a
    template's tasks, so the loop has the other half to draw), drawn from each template's tasks with
    a seed of the domain's name alone, so it is the same for every run and every --seed; the loop
    never draws these tasks (held_out_texts). Items as the NL2Bash evaluation's: {"id", "group"
    ("domain"), "query", "tool" (the template's, as the loop's prompts name it), "gold", "gold2"
    (the gold again), "difficulty" (the tool again: summarize's groups)}."""
    templates = [t for t in domain["templates"] if "gold" in t and not t.get("plain")]
    items = []
    for k, (template, values) in enumerate(drawn_in_turn(domain, templates, n, "held-out", lambda m: m // 2)):
        gold = fill(template["gold"], values)
        items.append({"id": f"held-{k:03d}", "group": "domain", "query": fill(template["task"], values),
                      "tool": template.get("tool"), "gold": gold, "gold2": gold,
                      "difficulty": template.get("tool") or "-"})
    return items


def tool_items(domain: dict, tools, n: int = 150) -> list[dict]:
    """The tools audit's items: n of the domain's tasks whose template names one of `tools` (those
    installed here), every such template in turn, drawn with a seed of the domain's name alone
    (the same for every --seed). No gold: the truth is the tool's own verdict. Items as
    held_out_items's, "group" "tools" and "gold" None."""
    templates = [t for t in domain["templates"] if t.get("tool") in tools]
    return [{"id": f"tools-{k:03d}", "group": "tools", "query": fill(template["task"], values),
             "tool": template["tool"], "gold": None, "gold2": None, "difficulty": template["tool"]}
            for k, (template, values) in enumerate(drawn_in_turn(domain, templates, n, "tools-audit", lambda m: m))]


def held_out_texts(domain: dict) -> frozenset:
    """The held-out set's task texts (empty for a domain without golds): excluded from every task
    the loop draws, the probe's included."""
    return frozenset(item["query"] for item in held_out_items(domain))
