"""support/nl2bash.py: metrics with known answers, the scorer on real items, the bounded bash
parse. (The sandbox's own tests, its containment included, are in test_sandbox.py.)"""
import concurrent.futures
import importlib.metadata
import math
import sys
import time

import pytest

from conftest import COPY_GOLD, TIMEOUT_S, item_with_gold, sandbox_unavailable

from support import nl2bash as ne
from support import sandbox as sb


# Deterministic items from four groups: additions, deletions, outputs (COPY_GOLD: conftest.py).
GREP_GOLD = 'grep -inr "Hello" /system/folder1'
DELETE_GOLD = "find /system/folder1 -name '*.doc' -exec rm \"{}\" \\;"
FIND_GOLD = "find /workspace -name '*.c' -size +1k -print"
SORT_GOLD = "sort -r /testbed/dir1/textfile1.txt > /testbed/dir1/textfile1_reverse_sorted.txt"
REV_GOLD = "echo 987654321 | rev | cut -c 4- | rev"
KNOWN_GOLDS = (COPY_GOLD, GREP_GOLD, DELETE_GOLD, FIND_GOLD, SORT_GOLD, REV_GOLD)


@pytest.fixture(scope="module")
def known(items):
    chosen = [item_with_gold(items, gold) for gold in KNOWN_GOLDS]
    try:
        evaluator = ne.Evaluator(chosen, workers=2, timeout_s=TIMEOUT_S)
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    with evaluator:
        yield evaluator


def score_one(evaluator: ne.Evaluator, gold: str, command: str) -> dict:
    """Score `command` on the item with this gold; the other items get their gold."""
    commands = [command if item["gold"] == gold else item["gold"] for item in evaluator.items]
    return evaluator.score(commands)[[item["gold"] for item in evaluator.items].index(gold)]


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------

def test_items_fixed_order_and_spread_subset(items):
    assert len(items) == 300 and len({item["id"] for item in items}) == 300
    assert {item["group"] for item in items} == {1, 2, 3, 4, 5}
    assert set(items[0]) == {"id", "group", "query", "gold", "gold2", "difficulty"}
    subset = ne.load_items(limit=20)
    assert subset == ne.load_items(limit=20) == [items[i * 300 // 20] for i in range(20)]
    assert {item["group"] for item in subset} == {1, 2, 3, 4, 5}
    assert ne.load_items(limit=300) == items
    for past_what_exists in (0, 301, 100_000):
        with pytest.raises(ValueError, match="between 1 and the 300 items"):
            ne.load_items(limit=past_what_exists)


# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------

def test_exact_match_normalises_whitespace():
    assert ne.normalize_command("  ls \t -l\n") == "ls -l"
    assert ne.exact_match("ls    -l ", ["pwd", "ls -l"])
    assert not ne.exact_match("ls -la", ["ls -l", "ls -a"])


def test_nlc2cmd_known_values():
    assert ne.nlc2cmd_score("find . -name '*.txt' | wc -l", ["find . -name '*.txt' | wc -l"]) == 1.0
    assert ne.nlc2cmd_score("pwd", ["ls -l"]) == -1.0  # different utility: (0 - 1) / 1
    # same utility, flags {-l, -a} against {-l, -h}: S_F = (2*1 - 3) / 2 = -0.5, S = (1 - 0.5) / 2
    assert ne.nlc2cmd_score("ls -l -a", ["ls -l -h"]) == pytest.approx(0.25)
    assert ne.nlc2cmd_score("ls -la", ["ls -l -a"]) == 1.0  # bundled short flags split
    # second utility differs: (1 + (-1)) / 2
    assert ne.nlc2cmd_score("find . -type f | sort", ["find . -type f | wc -l"]) == pytest.approx(0.0)
    # three utilities against one: (1 - 1 - 1) / 3
    assert ne.nlc2cmd_score("ls | sort | head", ["ls"]) == pytest.approx(-1 / 3)
    # max over references: -1 against pwd, (1 + (2*1 - 2) / 2) / 2 = 0.5 against ls -a
    assert ne.nlc2cmd_score("ls -l -a", ["pwd", "ls -a"]) == pytest.approx(0.5)


ENDLESS = "'${!'1"  # bashlex loops in _paramexpand on this one and never returns


def bounded(call, limit_s):
    """call(), and the seconds it took; fails if it took longer than limit_s."""
    started = time.monotonic()
    value = call()
    seconds = time.monotonic() - started
    assert seconds < limit_s, f"took {seconds:.1f} s, limit {limit_s} s"
    return value


def test_nlc2cmd_unparseable():
    assert ne.nlc2cmd_score('ls "', ["ls"]) == -1.0
    assert ne.nlc2cmd_score("", ["ls"]) == -1.0
    ne.command_structure("ls")  # the worker is started: what follows times the parse alone
    assert bounded(lambda: ne.nlc2cmd_score(ENDLESS, ["ls"]), 3 * ne.PARSE_TIMEOUT_S) == -1.0
    # bashlex cannot parse `time`: such a reference counts by exact equality only
    assert ne.nlc2cmd_score("time  echo 'hello'", ["time echo 'hello'"]) == 1.0
    assert ne.nlc2cmd_score("echo hello", ["time echo 'hello'"]) == -1.0


def test_endless_parse_is_stopped_whatever_the_calling_process_does():
    """The deadline cannot be defeated from inside: a tracer that swallows everything, a thread,
    and the parse after a killed worker all still answer in time."""
    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: None)
    try:
        assert bounded(lambda: ne.command_structure(ENDLESS), 3 * ne.PARSE_TIMEOUT_S + 10) is None
    finally:
        sys.settrace(previous)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = bounded(lambda: list(pool.map(ne.command_structure, [ENDLESS, "ls -l", ENDLESS])),
                          6 * ne.PARSE_TIMEOUT_S + 20)
    assert results == [None, [("ls", frozenset({"-l"}))], None]
    # the worker was killed: the next parse starts a new one and answers
    assert bounded(lambda: ne.command_structure("grep -rn foo ."), 20) == [("grep", frozenset({"-r", "-n"}))]


@pytest.mark.run_last
def test_endless_parse_is_stopped_after_the_whole_suite():
    """The hang this guards against appeared only after the rest of the suite had run."""
    assert bounded(lambda: ne.nlc2cmd_score(ENDLESS, ["ls"]), 3 * ne.PARSE_TIMEOUT_S + 10) == -1.0
    assert ne.command_structure("ls -a") == [("ls", frozenset({"-a"}))]


def test_command_structure_counts_nested_commands():
    assert ne.command_structure("find . -name '*.py' -exec md5sum {} +") == [
        ("find", frozenset({"-name", "-exec"})), ("md5sum", frozenset())]
    assert ne.command_structure("find . -print0 | xargs -0 -n 1 wc -l") == [
        ("find", frozenset({"-print0"})), ("xargs", frozenset({"-0", "-n"})), ("wc", frozenset({"-l"}))]
    assert ne.command_structure("cat $(ls -t | head -n 1)") == [
        ("cat", frozenset()), ("ls", frozenset({"-t"})), ("head", frozenset({"-n"}))]
    assert ne.command_structure("find /w -mtime -30 -size +1k") == [("find", frozenset({"-mtime", "-size"}))]


def execution(output="", changes=(), signatures=None) -> sb.Execution:
    return sb.Execution(output=output, changes=frozenset(changes), signatures=signatures or {}, exit_code=0)


def test_intercode_reward_known_values():
    gold = execution("alpha beta", [("/t/a", "added")], {"/t/a": "file:0644:1"})
    assert ne.intercode_reward(gold, gold) == 1.0
    # one extra change: p1 = round(0.33 * (1 - erf(1)), 2) = 0.05; no other part moves
    extra = execution("alpha beta", [("/t/a", "added"), ("/t/b", "deleted")], {"/t/a": "file:0644:1"})
    assert round(0.33 * (1 - math.erf(1)), 2) == 0.05
    assert ne.intercode_reward(gold, extra) == pytest.approx(0.01 + 0.05 + 0.33 + 0.33)
    # same change, other content: p2 = 0
    wrong = execution("alpha beta", [("/t/a", "added")], {"/t/a": "file:0644:2"})
    assert ne.intercode_reward(gold, wrong) == pytest.approx(0.67)
    # no output in common: p3 = 0
    assert ne.intercode_reward(gold, execution("gamma", gold.changes, gold.signatures)) == pytest.approx(0.67)


def test_output_similarity_falls_back_to_equality():
    assert ne.output_similarity("", "") == 1.0  # TF-IDF has no vocabulary here
    assert ne.output_similarity("!", "?") == 0.0
    assert ne.output_similarity("a b", "a b") == 1.0  # single letters are no TF-IDF tokens either
    assert ne.output_similarity("hello world", "hello world") == pytest.approx(1.0)
    assert 0 < ne.output_similarity("hello world", "hello there") < 1


def test_spearman():
    assert ne.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2 / (4*15)
    assert ne.spearman([1, 2, 3], [5, 5, 5]) is None
    assert ne.spearman([1], [2]) is None
    assert ne.spearman([], []) is None


def test_summarize():
    rows = [{"success": True, "reward": 1.0, "nlc2cmd": 1.0, "exact": True},
            {"success": False, "reward": 0.5, "nlc2cmd": -1.0, "exact": False},
            {"success": False, "reward": 0.3, "nlc2cmd": 0.0, "exact": False}]
    summary = ne.summarize(rows, [{"difficulty": 0}, {"difficulty": 0}, {"difficulty": 2}])
    assert summary["n"] == 3 and summary["success_rate"] == pytest.approx(1 / 3)
    assert summary["mean_reward"] == pytest.approx(0.6) and summary["nlc2cmd"] == pytest.approx(0.0)
    assert summary["per_difficulty"][0] == {"n": 2, "success_rate": 0.5, "mean_reward": 0.75,
                                            "nlc2cmd": 0.0, "exact_match": 0.5}
    assert summary["per_difficulty"][2]["n"] == 1


# ---------------------------------------------------------------------------------------------
# Scorer on real items
# ---------------------------------------------------------------------------------------------

def test_gold_against_itself_is_success(known):
    results = known.score([item["gold"] for item in known.items])
    assert {item["group"] for item in known.items} == {1, 2, 3, 4, 5}
    for result in results:
        assert result["success"] and result["reward"] == pytest.approx(1.0), result
        assert result["exact"] and result["nlc2cmd"] == 1.0 and not result["timed_out"]


def test_true_is_not_a_success(known):
    printed = score_one(known, GREP_GOLD, "true")
    assert not printed["success"] and printed["p3"] == 0.0
    added = score_one(known, COPY_GOLD, "true")  # the gold adds a file; `true` adds none
    assert not added["success"] and added["p1"] < 0.33


def test_deleting_the_wrong_file_scores_below_one(known):
    wrong = score_one(known, DELETE_GOLD, "rm /system/folder1/log1.log")
    assert wrong["reward"] < 1 and not wrong["success"] and wrong["p1"] == 0.0
    right = score_one(known, DELETE_GOLD, "rm /system/folder1/doc1.doc /system/folder1/doc2.doc")
    assert right["success"] and not right["exact"]  # the effect counts, not the string


def test_wrong_content_loses_p2(known):
    wrong = score_one(known, SORT_GOLD, "echo nope > /testbed/dir1/textfile1_reverse_sorted.txt")
    assert (wrong["p1"], wrong["p2"], wrong["p3"]) == (0.33, 0.0, 0.33)
    assert wrong["reward"] == pytest.approx(0.67)


def test_parallel_scoring_matches_serial(known):
    commands = ["ls -R /testbed /system", "true", "find /testbed /workspace -name '*.c' | sort", "rm -rf /testbed",
                "echo 123456789", "cat /nonexistent"]
    parallel = known.score(commands)
    known.workers = 1
    try:
        serial = known.score(commands)
    finally:
        known.workers = 2

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert strip(parallel) == strip(serial)


def test_scoring_against_doing_nothing(known):
    """against_nothing: `true` scored on every item beside the command; a command's bash complaint
    ("command not found") is taken out of its output before it is compared with doing nothing."""
    golds = [item["gold"] for item in known.items]
    commands = [COPY_GOLD if g == COPY_GOLD else "true" if g == GREP_GOLD else "nosuchprogram /testbed"
                for g in golds]
    rows = known.score(commands, against_nothing=True)
    plain = known.score(commands)
    for row, bare, gold in zip(rows, plain, golds):
        assert {k: v for k, v in row.items() if k not in ("seconds", "beats_reward", "nothing_reward", "trivial_item",
                                                            "gold_broken")} == \
            {k: v for k, v in bare.items() if k != "seconds"}  # the same scores, and more
        assert not row["gold_broken"]
        assert row["nothing_reward"] == score_one(known, gold, "true")["reward"]
        if gold == GREP_GOLD:  # the command is `true` itself
            assert row["beats_reward"] == row["nothing_reward"]
        elif gold != COPY_GOLD:  # its only output is bash's complaint: no better than doing nothing
            assert "command not found" in row["output"] and row["beats_reward"] == row["nothing_reward"]
    copy = rows[golds.index(COPY_GOLD)]
    assert copy["success"] and copy["beats_reward"] == 1.0 and not copy["trivial_item"]


def test_score_checks_length(known):
    with pytest.raises(ValueError):
        known.score(["ls"])


# ---------------------------------------------------------------------------------------------
# The benchmark's data
# ---------------------------------------------------------------------------------------------

def test_missing_icalfa_raises_one_line(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(sb.SandboxUnavailable) as error:
        ne.load_items()
    assert "\n" not in str(error.value) and "icalfa" in str(error.value)
