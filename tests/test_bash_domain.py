"""The built-in bash domain (support/domains/bash.json) never reproduces the NL2Bash benchmark:
every task it can generate differs from every benchmark query, and no template contains one. Its paths exist in the evaluation trees."""
import itertools
import random

import pytest

from conftest import sandbox_unavailable

from intrinsic_self_improvement import draw_tasks
from support import nl2bash as ne
from support.tasks import SLOT_PATTERN, builtin_domain, check_domain

BASH_DOMAIN = builtin_domain("bash")


def normalized(text: str) -> str:
    """Lower case, whitespace collapsed, trailing full stop dropped."""
    return " ".join(text.lower().split()).rstrip(".")


def all_tasks(domain: dict):
    """Every task the domain can produce: each template with every combination of its slots."""
    for template in domain["templates"]:
        slots = sorted(set(SLOT_PATTERN.findall(template["task"])))
        for values in itertools.product(*(domain["slots"][slot] for slot in slots)):
            chosen = dict(zip(slots, values))
            yield SLOT_PATTERN.sub(lambda m: chosen[m.group(1)], template["task"])


@pytest.fixture(scope="module")
def queries() -> set[str]:
    try:
        return {normalized(item["query"]) for item in ne.load_items()}
    except ne.SandboxUnavailable as error:
        sandbox_unavailable(error)


def test_domain_shape():
    check_domain(BASH_DOMAIN, "bash")
    assert BASH_DOMAIN["name"] == "bash" and 35 <= len(BASH_DOMAIN["templates"]) <= 45
    tools = {t["tool"] for t in BASH_DOMAIN["templates"]}
    assert {"find", "grep", "wc", "ls", "du", "sort", "head", "tail", "sed", "awk", "tar", "xargs", "cut",
            "uniq", "chmod", "cp", "mv", "mkdir", "cat"} <= tools
    used = {slot for t in BASH_DOMAIN["templates"] for slot in SLOT_PATTERN.findall(t["task"])}
    assert used == set(BASH_DOMAIN["slots"])  # every slot used, none missing


def test_no_generated_task_is_a_benchmark_query(queries):
    tasks = {normalized(task) for task in all_tasks(BASH_DOMAIN)}
    assert len(tasks) > 1000
    assert tasks.isdisjoint(queries)
    assert not [(q, t) for t in tasks for q in queries if q in t]  # nor contains one


def test_no_template_contains_a_benchmark_query(queries):
    for template in BASH_DOMAIN["templates"]:
        text = normalized(template["task"])
        assert not [q for q in queries if q in text], template


def test_paths_come_from_the_evaluation_trees():
    scripts = "".join(ne.icalfa_asset(f"docker/setup_nl2b_fs_{g}.sh").read_text() for g in ne.GROUPS)
    for slot in ("dir", "file", "csv", "archive", "dest"):
        for path in BASH_DOMAIN["slots"][slot]:
            assert path in scripts, path


def test_drawn_training_tasks_are_not_benchmark_queries(queries):
    drawn = draw_tasks(BASH_DOMAIN, 3000, random.Random(0))
    assert not {normalized(t.text) for t in drawn} & queries
