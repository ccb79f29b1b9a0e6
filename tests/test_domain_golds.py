"""Known answers in the bash domain (support/domain_eval.py, support/tasks.py): every template's
gold command does something for every task it makes, a task's gold is found from its text, golds
are checked when a domain is read, and the oracle arm (--select oracle) keeps exactly the
candidates whose run matches their task's gold."""
import pytest

from conftest import one_line_error, refuse_model_loading

import intrinsic_self_improvement as isi
import support
import support.domain_eval
import support.tasks
from support import nl2bash
from support.reports import compare_runs

BASH = support.tasks.builtin_domain("bash")


@pytest.mark.slow
def test_every_gold_does_something_for_every_task_its_template_makes(sandbox):
    """All 3,600 tasks of the bash domain's 45 templates: the gold passes the execution check
    and does what doing nothing does not (a broken gold, or a slot value it cannot take, fails)."""
    assert support.tasks.has_golds(BASH)
    failures = support.domain_eval.check_golds(BASH, sandbox, isi.execution_verdict, nl2bash.intercode_reward)
    assert failures == [], f"{len(failures)} failures, the first: {failures[:5]}"


def test_a_tasks_gold_is_found_from_its_text():
    slots = BASH["slots"]
    assert support.tasks.gold_command(BASH, "Find all .txt files under /testbed") == "find /testbed -name '*.txt'"
    # a value the domain has but this template does not draw (no .txt file under it) makes no task of it
    assert support.tasks.gold_command(BASH, "Find all .txt files under /testbed/dir1") is None
    assert support.tasks.gold_command(BASH, "Rename /testbed/hello.c to /testbed/hello.c.bak") == \
        "mv /testbed/hello.c /testbed/hello.c.bak"
    # the same slot twice must have the same value; a value the slot does not have makes no task
    assert support.tasks.gold_command(BASH, "Rename /testbed/hello.c to /testbed/Hello.java.bak") is None
    assert support.tasks.gold_command(BASH, "Find all .txt files under /elsewhere") is None
    assert support.tasks.gold_command(support.tasks.builtin_domain("pentest"), "Scan 10.0.0.1") is None
    for template in BASH["templates"]:  # every task of every template finds its own template's gold
        for values in support.domain_eval.instantiations(template, slots)[:3]:
            task = support.tasks.fill(template["task"], values)
            assert support.tasks.gold_command(BASH, task) == support.tasks.fill(template["gold"], values)


def test_a_gold_is_checked_when_the_domain_is_read():
    domain = {"slots": {"d": ["/data"]}, "templates": [{"task": "List {d}", "gold": "ls {d}"}]}
    assert support.tasks.check_domain(domain, "t") and support.tasks.has_golds(domain)
    for gold, message in [("", "must be a non-empty string"), (3, "must be a non-empty string"),
                          ("ls {d} {other}", "uses slot\\(s\\) \\['other'\\] its task does not name")]:
        with pytest.raises(support.UsageError, match=message):
            support.tasks.check_domain({"slots": {"d": ["/data"], "other": ["x"]},
                                        "templates": [{"task": "List {d}", "gold": gold}]}, "t")
    assert not support.tasks.has_golds({"templates": [{"task": "List", "gold": "ls"}, {"task": "Show"}]})
    # a template's own values: a subset of the domain's, for slots its task uses; drawn and matched by it
    own = {"slots": {"d": ["/a", "/b"]}, "templates": [{"task": "List {d}", "gold": "ls {d}", "slots": {"d": ["/b"]}}]}
    assert support.tasks.check_domain(own, "t")
    assert isi.draw_tasks(own, 5, __import__("random").Random(0))[0].text == "List /b"
    assert support.tasks.gold_command(own, "List /b") == "ls /b" and support.tasks.gold_command(own, "List /a") is None
    for slots, message in [({"d": ["/c"]}, "must be a non-empty list of values of slots.d"), ({"d": []}, "non-empty"),
                           ({"e": ["/a"]}, "names \\{e\\}, which its task does not use"), (["/a"], "must be an object")]:
        with pytest.raises(support.UsageError, match=message):
            support.tasks.check_domain({"slots": {"d": ["/a", "/b"], "e": ["/a"]},
                                        "templates": [{"task": "List {d}", "slots": slots}]}, "t")


def test_the_oracle_keeps_exactly_the_candidates_that_match_their_gold():
    records = [{"command": c, "gold_match": m} for c, m in
               [("ls", True), ("ls -a", False), ("", False), ("find .", True), ("true", False), ("ls x", None)]]
    chosen = isi.select_for_training(records, "oracle", isi.resolve_signal("inversion"), None, copies=3,
                                     threshold=0.5, floor=0.0)
    assert chosen == [0, 3]


def test_the_sized_oracle_keeps_as_many_as_the_signal_the_closest_to_their_gold():
    """oracle-sized: the signal keeps 3 (score >= 0.5); the oracle keeps the 3 candidates with a
    command of the highest gold_reward, the tie at 0.4 broken by the generator (both ways seen)."""
    rows = [("ls", 0.9, 0.0), ("ls -a", 0.8, 1.0), ("", 0.7, 0.0), ("find .", 0.1, 0.6), ("true", 0.2, 0.4),
            ("ls x", 0.3, 0.4)]
    records = [{"task": f"t{i // 3}", "command": c, "usable": bool(c), "score": score, "gold_reward": reward}
               for i, (c, score, reward) in enumerate(rows)]
    signal = isi.resolve_signal("inversion")
    assert isi.select_for_training(records, "threshold", signal, None, copies=3, threshold=0.5, floor=0.0) == [0, 1, 2]
    import random
    seen = {tuple(isi.select_for_training(records, "oracle-sized", signal, random.Random(seed), copies=3,
                                          threshold=0.5, floor=0.0)) for seed in range(20)}
    assert seen == {(1, 3, 4), (1, 3, 5)}


def test_execution_with_golds_marks_the_runs_that_match(sandbox):
    """gold_match: a run that does what its task's gold does (the same output, another spelling
    included) matches; another output, an error, doing nothing or no command does not."""
    commands = ["find /testbed/dir1 -name '*.txt'", "find /testbed/dir1 -name \"*.txt\"", "ls /testbed/dir1",
                "mkdir -p /backup/notes", "mkdir /backup/notes", "true"]
    golds = ["find /testbed/dir1 -name '*.txt'", "mkdir -p /backup/notes"]  # one per task, 3 candidates each
    records = [{"task": f"t{i // 3}", "tool": None, "command": c, "usable": isi.is_usable_command(c)}
               for i, c in enumerate(commands)]
    rows = isi.execute_commands(sandbox, records, copies=3, golds=golds).records
    assert [row["gold_match"] for row in rows] == [True, True, False, True, True, False]
    assert [row["gold_match"] for row in rows] == [row["gold_reward"] == 1.0 for row in rows]
    assert 0 <= rows[2]["gold_reward"] < 1 and rows[5]["gold_reward"] < 1
    unusable = [{"task": "t", "tool": None, "command": "", "usable": False}]
    assert isi.execute_commands(sandbox, unusable, copies=1, golds=["ls /testbed"]).records[0]["gold_match"] is False


def test_the_oracle_needs_a_domain_with_golds(tmp_path, capsys, monkeypatch):
    refuse_model_loading(monkeypatch)
    assert isi.main(["--output", str(tmp_path), "--select", "oracle"]) == 2  # pentest: no golds
    assert "--select oracle compare" in (line := one_line_error(capsys)) and "pentest domain has none" in line
    assert isi.main(["--output", str(tmp_path), "--select", "oracle-sized"]) == 2
    assert "--select oracle-sized compare" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_held_out_set_is_fixed_and_never_drawn():
    """The same items on every call (no seed enters it), every template represented, at most half of
    a template's tasks; the loop's draws exclude them."""
    items = support.domain_eval.held_out_items(BASH)
    assert items == support.domain_eval.held_out_items(BASH) and 140 <= len(items) <= 150
    assert {i["difficulty"] for i in items} == {t["tool"] for t in BASH["templates"]}
    assert all(i["gold"] == support.tasks.gold_command(BASH, i["query"]) for i in items)
    texts = support.domain_eval.held_out_texts(BASH)
    drawn = isi.draw_tasks(BASH, 3000, __import__("random").Random(0), exclude=texts)
    assert not {t.text for t in drawn} & texts


@pytest.mark.slow
def test_an_oracle_run_evaluated_on_held_out_tasks(tiny_model_dir, tmp_path, capsys):
    """--select oracle --eval domain on the tiny model: the note that the arm uses labels; every
    candidate of the batch trained on has gold_match and exactly those that match were selected;
    the held-out evaluation before training and after the cycle, in progress.json and its files;
    no task the loop drew (batches, probe) is held out."""
    import json
    from conftest import read_progress, tiny_args
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "o", "--domain", "bash", "--select",
                     "oracle", "--eval", "domain")
    assert isi.main(args) == 0
    out = capsys.readouterr().out
    assert "note: --select oracle trains on the candidates that match their task's gold command" in out
    assert "eval domain held-out tasks n=" in out
    run = tmp_path / "o"
    history = read_progress(run)["history"]
    held = support.domain_eval.held_out_items(BASH)
    assert history["eval_domain_initial"]["n"] == len(held) == history["cycles"][0]["eval_domain"]["n"]
    assert history["cycles"][0]["eval"] is None  # NL2Bash not asked for
    rows = [json.loads(line) for line in (run / "examples_cycle_1.jsonl").read_text().splitlines()]
    before = [r for r in rows if r["stage"] == "before"]
    assert before and all(isinstance(r["gold_match"], bool) for r in before)
    assert [r["selected"] for r in before] == [r["gold_match"] for r in before]
    evaluated = [json.loads(line) for line in (run / "eval_domain_cycle_1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in evaluated] == [i["id"] for i in held]
    assert not {r["task"] for r in rows} & support.domain_eval.held_out_texts(BASH)
    table = compare_runs([str(run)], tmp_path / "compare.png")
    assert "held-out success 0->N" in table.splitlines()[0] and "the domain's held-out tasks: against" in table
