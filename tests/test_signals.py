"""Label-free signals (--signal) and --train-from: verdicts and agreement groups with known
answers on commands written here, run in the bash domain's own sandboxed file system; selection
per signal; the domain's environment kept apart from the benchmark; end-to-end runs on a tiny
model whose commands are replaced by known ones."""
import json
import random

import pytest
import torch

from conftest import figures, one_line_error, read_progress, refuse_model_loading, sandbox_unavailable, tiny_args

import intrinsic_self_improvement as isi
from support import health
import support
import support.model
import support.shellcheck
import support.tasks
from support import nl2bash as ne
from support import sandbox as sb


# (command, verdict) in the bash domain's file system
VERDICTS = [
    ("find /testbed -name '*.txt'", "passed"),
    ("grep -c a /testbed/dir1/textfile1.txt", "passed"),
    ("mkdir /backup/new", "passed"),  # prints nothing, changes the file system
    ("tar -tzf /workspace/archive.tar.gz", "passed"),
    ("cut -d, -f1 /workspace/dir2/csvfile1.csv | head -n 2", "passed"),
    ("true", "no effect"),
    ("grep zzz_not_there /testbed/textfile7.txt", "exit status 1"),
    ("nmapx -p 22 localhost", "program not found"),
    ("ls /testbed | nosuchprogram", "program not found"),  # exit 0 from the pipeline, still not found
    ("grep -Q x /testbed/textfile7.txt", "usage error"),
    ("cp /testbed/textfile7.txt", "usage error"),
    ("cat /testbed/missing.txt | wc -l", "missing file"),  # exit 0, but it read nothing
    ("echo 'unterminated", "syntax error"),
    ("sleep 30", "timed out"),
    ("yes", "output past the cap"),
]


def test_execution_verdicts_of_known_commands(sandbox):
    commands = [c for c, _ in VERDICTS]
    runs = sandbox.run_all(["domain"] * len(commands), commands)
    assert [isi.execution_verdict(r) for r in runs] == [v for _, v in VERDICTS]


def test_agreement_groups_commands_by_what_they_do(sandbox):
    task = ["ls /testbed", "ls /testbed/", "ls -a /testbed", "cd /testbed && ls", "ls /nothing"]
    runs = sandbox.run_all(["domain"] * len(task), task)
    assert isi.agreement_group(runs) == [0, 1, 3]  # same output; -a differs; the error is no result
    changes = ["mkdir /backup/x", "mkdir -p /backup/x", "mkdir /backup/y", "true", "true"]
    runs = sandbox.run_all(["domain"] * len(changes), changes)
    assert isi.agreement_group(runs) == [0, 1]  # same change; `true` agrees with itself but does nothing


def run_of(output="", changes=(), exit_code=0, **kw) -> sb.Execution:
    changes = frozenset(changes)
    return sb.Execution(output=output, changes=changes, signatures={p: "file:0644:x" for p, k in changes if k != "deleted"},
                        exit_code=exit_code, **kw)


@pytest.mark.parametrize("runs, kept", [
    ([run_of("a"), run_of("b"), run_of("a")], [0, 2]),
    ([run_of("a"), run_of("b"), run_of("c")], []),  # no group of two
    ([run_of("a"), run_of("b"), run_of("b"), run_of("a")], [0, 3]),  # a tie goes to the group met first
    ([run_of(""), run_of(""), run_of("x")], []),  # agreeing on nothing observable
    ([run_of("usage: x", exit_code=2)] * 3 + [run_of("ok")] * 2, [3, 4]),  # the larger group is an error
    ([run_of("t", timed_out=True, exit_code=None)] * 2, []),
    ([None, run_of("a"), None, run_of("a")], [1, 3]),  # no command to run
    ([run_of(changes={("/f", "added")}), run_of(changes={("/f", "added")}), run_of("a")], [0, 1]),
    ([run_of("a", exit_code=0), run_of("a", exit_code=1)], []),  # same output, different exit status
])
def test_agreement_group_known_answers(runs, kept):
    assert isi.agreement_group(runs) == kept


def test_selection_per_signal():
    flags = [(True, True, False), (True, False, False), (False, True, True), (False, False, False), (True, True, True)]
    records = [{"command": "c", "score": 0.9 if a else 0.1, "accepted": a, "passed": p, "agreed": g} for a, p, g in flags]
    pick = lambda signal, mode="threshold": isi.select_for_training(  # noqa: E731
        records, mode, isi.resolve_signal(signal), random.Random(0), copies=1, threshold=0.5, floor=4 / 6)
    assert pick("inversion") == [0, 1, 4]
    assert pick("execution") == [0, 2, 4]
    assert pick("agreement") == [2, 4]
    assert pick("inversion+execution") == [0, 4]
    assert len(pick("agreement", "random")) == 2 and pick("execution", "all") == [0, 1, 2, 3, 4]


def candidate(ladder=0.0, likelihood=0.0, score=0.0, usable=True):
    return {"command": "c" if usable else "", "usable": usable, "ladder": ladder, "likelihood": likelihood,
            "score": score}


# three tasks of three candidates each; the ladder's floor (climbed to 'exits 0') is 4/6
LADDER_TASKS = [
    candidate(5 / 6, 0.2, 0.9), candidate(5 / 6, 0.4, 0.1), candidate(1 / 6, 0.9, 0.8),  # two on top
    candidate(3 / 6, 0.7, 0.7), candidate(2 / 6, 0.8, 0.9), candidate(0, 0, 0, usable=False),  # none runs
    candidate(4 / 6, 0.1, 0.2), candidate(1.0, 0.05, 0.3), candidate(1.0, 0.3, 0.6),  # floor and two on top
]


@pytest.mark.parametrize("signal, threshold, kept", [
    ("ladder", 0.5, [0, 1, 7, 8]),  # every candidate on its task's top rung, when that is >= 'exits 0'
    ("ladder+likelihood", 0.5, [1, 8]),  # of those, the likeliest
    ("ladder+inversion", 0.5, [0, 8]),  # of those, the best intrinsic score
    ("likelihood", 0.5, [2, 4]),  # per task the likeliest, when it clears the threshold
    ("likelihood", 0.85, [2]),
    ("likelihood", 0.0, [2, 4, 8]),
])
def test_selection_of_the_ranking_signals(signal, threshold, kept):
    assert isi.select_for_training(LADDER_TASKS, "threshold", isi.resolve_signal(signal), random.Random(0), copies=3,
                                   threshold=threshold, floor=4 / 6) == kept


@pytest.mark.parametrize("rule, values, kept", [
    ("threshold", [0.4, 0.5, None], [False, True, False]),
    ("passes", [1, 0, None], [True, False, False]),
    ("passes", [True, False], [True, False]),
    ("ladder", [4 / 6, 0.5, 1.0], [False, False, True]),  # the top rung only
    ("ladder", [4 / 6, 0.5, 4 / 6], [True, False, True]),  # on the floor: kept, every one on it
    ("ladder", [0.5, 0.5], [False, False]),  # below the floor: starved
    ("group", [2, 2, 1, 0], [True, True, False, False]),
    ("group", [1, 1, 0], [False, False, False]),  # no group of two: starved
    ("rank", [None, -3.0, -1.0], [False, False, True]),
    ("rank", [-1.0, -3.0, -1.0], [True, False, False]),  # a tie: the first
    ("rank", [None, None], [False, False]),
    ("rank_at_threshold", [0.2, 0.7, 0.6], [False, True, False]),
    ("rank_at_threshold", [0.2, 0.4, None], [False, False, False]),  # the best is below the threshold
])
def test_each_rule_keeps_a_tasks_candidates(rule, values, kept):
    assert isi.kept_in_task(rule, values, threshold=0.5, floor=isi.ladder_floor(True)) == kept


def test_a_task_without_a_command_gives_likelihood_nothing():
    records = [candidate(usable=False), candidate(usable=False)]
    assert isi.kept_by_signal(records, *isi.resolve_signal("likelihood"), 2, 0.0, 4 / 6) == []


def test_execute_commands_gives_every_candidate_its_ladder(sandbox):
    """execute_commands gives every candidate its ladder: the levels of known commands, each
    failing at one level, and its value."""
    commands = ["ls /testbed", "echo 'unterminated", "nosuchprogram x", "grep zzz /testbed/textfile7.txt",
                "grep -Q x /testbed/textfile7.txt", "true", "# comment"]
    records = [{"task": "t", "tool": None, "command": c, "usable": isi.is_usable_command(c)} for c in commands]
    rows = isi.execute_commands(sandbox, records, copies=len(commands)).records
    expected = {"ls /testbed": 1.0, "echo 'unterminated": 0.0, "nosuchprogram x": 1 / 6 if support.shellcheck.shellcheck_available() else 1 / 5,
                "true": 5 / 6 if support.shellcheck.shellcheck_available() else 4 / 5}
    for row in rows:
        if row["command"] in expected:
            assert row["ladder"] == pytest.approx(expected[row["command"]], abs=1e-4), row["command"]
    assert rows[-1]["ladder"] == 0.0 and rows[-1]["ladder_levels"] is None  # not a command: not run
    assert rows[3]["ladder_levels"]["exits_zero"] == 0 and rows[3]["ladder_levels"]["programs_exist"] == 1
    assert rows[4]["ladder_levels"]["no_usage_error"] == 0


@pytest.mark.parametrize("measured, reasons", [
    ({"restate_rate": 0.1, "no_command_rate": 0.3, "distinct_2": 0.8}, []),  # the untrained model's batches
    ({"restate_rate": 0.93, "no_command_rate": 0.0, "distinct_2": 0.6}, ["restate_rate 0.93 >= 0.5"]),
    ({"restate_rate": 0.0, "no_command_rate": 0.0, "distinct_2": 0.41}, ["distinct_2 0.41 < 0.5"]),
    ({"restate_rate": 0.0, "no_command_rate": 0.7, "distinct_2": 0.8}, ["no_command_rate 0.70 >= 0.6"]),
])
def test_collapse_reasons_known_answers(measured, reasons):
    assert health.collapse_reasons(measured) == reasons


def test_restated_tasks_are_told_from_commands():
    task = "Scan ports 8080,8443 on 10.0.0.1"
    assert health.restates_task(task, "You can use the nmap command to scan ports 8080,8443 on 10.0.0.1")
    assert not health.restates_task(task, "nmap -p 8080,8443 10.0.0.1")
    assert not health.restates_task(task, "You can use the following command")  # prose, but not about the task
    assert not health.restates_task("List the files in /testbed", "ls -la /testbed")


def test_health_of_constructed_batches():
    """A healthy batch (distinct commands, each a command) is not collapsed; the same batch
    restated, or with every candidate of a task the same `ls`, is."""
    tasks = [f"Count the lines of /testbed/file{k}.txt" for k in range(6)]
    ways = [["wc -l", "grep -c ''", "awk 'END{print NR}'"], ["head -n 3", "sed -n 1,3p", "awk 'NR<=3'"],
            ["sort -u", "sort | uniq", "uniq -c"], ["tail -n 2", "sed -n '$p'", "tac | head -n 1"],
            ["cut -c1-5", "grep -v '^$'", "nl -ba"], ["cat -n", "less -N", "tr a-z A-Z <"]]

    def batch(write):
        return [{"task": t, "command": write(t, j, k), "usable": True} for k, t in enumerate(tasks) for j in range(3)]
    healthy = batch(lambda t, j, k: ways[k][j] + " " + t.split()[-1])
    restated = batch(lambda t, j, k: f"You can use the wc command to count the lines of {t.split()[-1]}")
    repeated = batch(lambda t, j, k: "ls " + t.split()[-1])
    assert health.collapse_reasons(health.generation_health(healthy)) == []
    assert health.collapse_reasons(health.generation_health(restated))[0].startswith("restate_rate 1.00")
    assert health.collapse_reasons(health.generation_health(repeated))[0].startswith("distinct_2 0.33")


@pytest.mark.parametrize("signal, before, after, marked", [
    ("inversion", {"mean_score": 0.2, "execution_pass_rate": 0.5}, {"mean_score": 0.4, "execution_pass_rate": 0.3}, True),
    ("inversion", {"mean_score": 0.2, "execution_pass_rate": 0.5}, {"mean_score": 0.4, "execution_pass_rate": 0.5}, False),
    ("inversion", {"mean_score": 0.4, "execution_pass_rate": 0.5}, {"mean_score": 0.2, "execution_pass_rate": 0.3}, False),
    ("ladder", {"mean_ladder": 0.5, "execution_pass_rate": 0.5}, {"mean_ladder": 0.6, "execution_pass_rate": 0.4}, True),
    ("ladder+likelihood", {"mean_likelihood": 0.1, "execution_pass_rate": 0.5},
     {"mean_likelihood": 0.2, "execution_pass_rate": 0.4}, True),
    ("execution", {"execution_pass_rate": 0.5}, {"execution_pass_rate": 0.4}, None),  # its own score is the pass rate
    ("agreement", {"agreement_rate": 0.0, "execution_pass_rate": 0.5}, {"agreement_rate": 0.1, "execution_pass_rate": 0.4},
     None),  # agreement implies passing; on the probe (one command a task) it is always 0
    ("inversion", {"mean_score": 0.2}, {"mean_score": 0.4}, None),  # nothing executed
])
def test_signal_up_execution_down(signal, before, after, marked):
    assert isi.signal_up_execution_down(signal, before, after) is marked


def test_the_environment_is_built_from_the_domain_alone():
    script = support.tasks.environment_script(support.tasks.builtin_domain("bash"))
    assert script == support.tasks.environment_script(support.tasks.builtin_domain("bash"))  # deterministic
    assert support.tasks.environment_script(support.tasks.builtin_domain("pentest")) is None
    try:
        items = ne.load_items()
        setups = "".join(ne.icalfa_asset(f"docker/setup_nl2b_fs_{g}.sh").read_text() for g in ne.GROUPS)
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    for item in items:  # no query and no gold command reaches it (but for a few like `w`, too short to tell)
        for text in (item["query"], item["gold"], item["gold2"]):
            assert len(text) < 12 or text not in script
    # no line of the benchmark's file contents either (lines long enough to be content, not a path)
    ours = {line.strip() for line in script.splitlines() if len(line.strip()) >= 16 and "/" not in line}
    theirs = {line.strip() for line in setups.splitlines()}
    assert ours and not ours & theirs


def test_a_domain_environment_is_checked():
    domain = {"slots": {"d": ["/data"], "w": ["word"]}, "templates": [{"task": "List {d}"}]}
    assert support.tasks.check_domain(domain | {"environment": {"directories": ["d"], "setup": "touch /data/x"}}, "t")
    for environment, message in [({"directories": ["nope"]}, "not in 'slots'"), ({"files": ["w"]}, "not an absolute path"),
                                 ({"folders": ["d"]}, "must be an object"), ({"setup": 3}, "must be text")]:
        with pytest.raises(support.UsageError, match=message):
            support.tasks.check_domain(domain | {"environment": environment}, "t")


def test_signal_needing_an_environment_is_refused_without_one(tmp_path, capsys, monkeypatch):
    refuse_model_loading(monkeypatch)
    assert isi.main(["--output", str(tmp_path), "--signal", "execution"]) == 2  # pentest: no file system
    assert "pentest domain has none" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("value", ["0", "6", "1,x", "", "3;4"])
def test_bad_eval_fs_is_one_line(value, tmp_path, capsys, monkeypatch):
    refuse_model_loading(monkeypatch)
    assert isi.main(["--output", str(tmp_path), "--eval-fs", value]) == 2
    assert "--eval-fs" in one_line_error(capsys)


def test_items_by_file_system():
    try:
        every = ne.load_items()
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    chosen = ne.load_items(groups=(3, 5))
    assert {i["group"] for i in chosen} == {3, 5}
    assert chosen == [i for i in every if i["group"] in (3, 5)]
    assert {i["group"] for i in ne.load_items(4, groups=(1, 2))} <= {1, 2}
    with pytest.raises(ValueError):
        ne.load_items(groups=(6,))


# ---------------------------------------------------------------------------------------------
# End to end: a tiny model whose outputs are mapped onto known commands
# ---------------------------------------------------------------------------------------------

KNOWN_COMMANDS = ["ls /testbed", "wc -l /testbed/textfile7.txt", "nosuchprogram /testbed", "true", "ls /testbed"]


@pytest.fixture
def known_commands(monkeypatch):
    """The tiny model's text picks one of KNOWN_COMMANDS (by its length): some pass, some fail,
    some agree, as a real model's would, but known here."""
    monkeypatch.setattr(isi, "extract_command", lambda output: KNOWN_COMMANDS[len(output) % len(KNOWN_COMMANDS)])


def examples(run_dir, cycle) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"examples_cycle_{cycle}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signal, flag", [("execution", "passed"),
                                          pytest.param("agreement", "agreed", marks=pytest.mark.slow),
                                          pytest.param("inversion+execution", None, marks=pytest.mark.slow)])
def test_a_run_trains_on_what_its_signal_keeps(signal, flag, tiny_model_dir, tmp_path, known_commands, sandbox):
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "s", "--domain", "bash",
                     "--signal", signal, "--candidates", "3", "--tasks", "4", "--threshold", "0.13")
    assert isi.main(args) == 0
    history = read_progress(tmp_path / "s")["history"]
    for cycle in (1, 2):
        rows = examples(tmp_path / "s", cycle)
        expected = {"ls /testbed": "passed", "wc -l /testbed/textfile7.txt": "passed",
                    "nosuchprogram /testbed": "program not found", "true": "no effect"}
        assert {r["command"]: r["verdict"] for r in rows} == expected
        assert all({"score", "accepted", "verdict", "passed", "agreed", "execution"} <= set(r) for r in rows)
        before = [r for r in rows if r["stage"] == "before"]
        keep = {"passed": lambda r: r["passed"], "agreed": lambda r: r["agreed"],
                None: lambda r: r["passed"] and r["accepted"]}[flag]
        assert [r["selected"] for r in before] == [keep(r) for r in before]
        summary = history["cycles"][cycle - 1]["before"]
        assert summary["execution_pass_rate"] == round(sum(r["passed"] for r in before) / len(before), 4)
        assert history["cycles"][cycle - 1]["training"]["selected"] == sum(r["selected"] for r in before)
        assert history["cycles"][cycle - 1]["timing"]["before"]["execute_s"] >= 0
        assert "execution_pass_rate" in history["cycles"][cycle - 1]["probe"]
    before = [r for c in (1, 2) for r in examples(tmp_path / "s", c) if r["stage"] == "before"]
    assert any(r["selected"] for r in before) and not all(r["selected"] for r in before)  # not trivially so


def top_of_ladder(rows: list[dict], copies: int, floor: float, rank: str | None) -> list[bool]:
    """Written out again here: per task, the candidates at its highest ladder value when that is
    at least the floor; with `rank`, the first of them with the highest value of `rank`."""
    kept = []
    for first in range(0, len(rows), copies):
        group = rows[first:first + copies]
        top = max(r["ladder"] for r in group)
        on_top = [top >= floor - 1e-9 and r["ladder"] == top for r in group]
        if rank and any(on_top):
            best = max((r[rank] for r, on in zip(group, on_top) if on))
            first_best = next(k for k, (r, on) in enumerate(zip(group, on_top)) if on and r[rank] == best)
            on_top = [k == first_best for k in range(len(group))]
        kept += on_top
    return kept


@pytest.mark.parametrize("signal", ["ladder", pytest.param("ladder+likelihood", marks=pytest.mark.slow),
                                    pytest.param("likelihood", marks=pytest.mark.slow)])
def test_a_run_trains_on_what_a_ranking_signal_keeps(signal, tiny_model_dir, tmp_path, known_commands, sandbox):
    """Every candidate carries every signal's value; the selected ones are those the rule keeps."""
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "s", "--domain", "bash",
                     "--signal", signal, "--candidates", "3", "--tasks", "4", "--threshold", "0.0", "--score-all")
    assert isi.main(args) == 0
    floor = 4 / 6 if support.shellcheck.shellcheck_available() else 3 / 5
    history = read_progress(tmp_path / "s")["history"]
    for cycle in (1, 2):
        rows = examples(tmp_path / "s", cycle)
        assert all({"score", "accepted", "passed", "agreed", "ladder", "ladder_levels", "likelihood", "coder",
                    "reviewer"} <= set(r) for r in rows)
        assert {r["command"]: r["ladder"] for r in rows if r["command"] in ("ls /testbed", "nosuchprogram /testbed")} \
            == {"ls /testbed": 1.0, "nosuchprogram /testbed": round(1 / 6 if support.shellcheck.shellcheck_available() else 1 / 5, 4)}
        for r in rows:
            if r["usable"]:
                assert r["likelihood"] == pytest.approx(2.718281828 ** ((r["coder"] + r["reviewer"]) / 2), rel=1e-4)
        before = [r for r in rows if r["stage"] == "before"]
        if signal == "likelihood":
            keep = []
            for first in range(0, len(before), 3):
                group = [r["likelihood"] for r in before[first:first + 3]]
                keep += [k == group.index(max(group)) for k in range(3)]
        else:
            keep = top_of_ladder(before, 3, floor, "likelihood" if "+" in signal else None)
        assert [r["selected"] for r in before] == keep
        assert history["cycles"][cycle - 1]["training"]["selected"] == sum(keep)
        assert "mean_ladder" in history["cycles"][cycle - 1]["probe"] and "mean_likelihood" in history["cycles"][cycle - 1]["probe"]
        assert history["cycles"][cycle - 1]["signal_up_execution_down"] in (True, False)
    before = [r for c in (1, 2) for r in examples(tmp_path / "s", c) if r["stage"] == "before"]
    assert any(r["selected"] for r in before) and not all(r["selected"] for r in before)


def test_the_likelihood_is_computed_where_the_signal_needs_it(tiny_model_dir, tmp_path, known_commands, sandbox):
    """Without --score-all, ladder+likelihood scores only the candidates it ranks (the same
    selection as with every candidate scored), and ladder none."""
    base = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--domain", "bash", "--candidates", "3", "--tasks", "4")
    assert isi.main(base + ["--name", "lean", "--signal", "ladder+likelihood"]) == 0
    assert isi.main(base + ["--name", "all", "--signal", "ladder+likelihood", "--score-all"]) == 0
    assert isi.main(base + ["--name", "none", "--signal", "ladder"]) == 0
    lean, full, none = (examples(tmp_path / name, 1) for name in ("lean", "all", "none"))
    floor = 4 / 6 if support.shellcheck.shellcheck_available() else 3 / 5
    before = [r for r in lean if r["stage"] == "before"]
    scored = [r for r in before if "likelihood" in r]
    assert scored and len(scored) < len(before)
    assert all(r["ladder"] >= floor - 1e-9 for r in scored)
    assert [r["selected"] for r in before] == [r["selected"] for r in full if r["stage"] == "before"]
    assert not any("likelihood" in r for r in none)


def test_stop_on_collapse_stops_after_a_collapsed_cycle_and_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                    sandbox):
    monkeypatch.setattr(isi, "extract_command", lambda output: "ls /testbed")  # every candidate the same
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "c", "--domain", "bash")
    assert isi.main(args + ["--stop-on-collapse"]) == 0
    out = capsys.readouterr().out
    assert "stopped after cycle 1 of 3 (--stop-on-collapse: distinct_2 " in out
    progress = read_progress(tmp_path / "c")
    assert progress["last_completed_cycle"] == 1
    assert progress["history"]["cycles"][0]["collapse"][0].startswith("distinct_2")
    results = json.loads((tmp_path / "c" / "self_improvement_results.json").read_text())
    assert results["collapsed_cycles"] == [1] and results["cycles"] == 1
    assert isi.main(args + ["--resume"]) == 0  # on, without the guard
    progress = read_progress(tmp_path / "c")
    assert progress["last_completed_cycle"] == 3
    assert [bool(c["collapse"]) for c in progress["history"]["cycles"]] == [True] * 3


@pytest.mark.slow
def test_train_from_base_trains_a_fresh_adapter_on_all_selected_and_resumes(tiny_model_dir, tmp_path, known_commands,
                                                                           sandbox):
    base = ("--domain", "bash", "--signal", "execution", "--train-from", "base")
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "straight", *base)) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "split", *base)) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "split", "--resume", *base)) == 0
    straight = read_progress(tmp_path / "straight")
    assert figures(read_progress(tmp_path / "split")) == figures(straight)
    cycles = straight["history"]["cycles"]
    selected = [c["training"]["selected"] for c in cycles]
    assert [c["training"]["pairs"] for c in cycles] == [sum(selected[:k + 1]) for k in range(3)]  # everything so far
    assert selected[0] > 0


def test_restart_adapter_restores_the_initial_weights(tiny_model_dir):
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--precision", "fp32"])
    lm = support.model.load_language_model(cfg)
    initial = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    isi.train_adapter(lm, cfg, [(isi.Task("List /testbed"), "ls /testbed")] * 4, seed=0)
    trained = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(initial[n], p) for n, p in trained.items())
    isi.restart_adapter(lm)
    assert all(torch.equal(initial[n], p) for n, p in lm.model.named_parameters() if p.requires_grad)


def test_without_a_sandbox_execution_is_off_or_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap to be found: nothing may run unsandboxed
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "off", "--domain", "bash")) == 0
    assert "execution off: bubblewrap not found" in capsys.readouterr().out
    rows = examples(tmp_path / "off", 1)
    assert rows and not any("verdict" in r for r in rows)  # no execution results, none made up
    refuse_model_loading(monkeypatch)
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "refused", "--domain", "bash",
                     "--signal", "agreement")
    assert isi.main(args) == 2
    assert "--signal agreement: bubblewrap not found" in one_line_error(capsys)
