"""support/nl2bash.py and support/sandbox.py: metrics with known answers, the scorer on real items, and the sandbox's
containment (each hostile command is checked against the host afterwards)."""
import concurrent.futures
import importlib.metadata
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import sandbox_unavailable

from support import nl2bash as ne
from support import sandbox as sb

TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def items() -> list[dict]:
    try:
        return ne.load_items()
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)


def item_with_gold(items: list[dict], gold: str) -> dict:
    return next(item for item in items if item["gold"] == gold)


# Deterministic items from four groups: additions, deletions, outputs.
COPY_GOLD = "cp /testbed/hello.php /testbed/hello-COPY.php"
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


def test_snapshot_and_diff(tmp_path):
    (tmp_path / "keep.txt").write_text("a")
    (tmp_path / "change.txt").write_text("b")
    (tmp_path / "gone.txt").write_text("c")
    (tmp_path / "usr").mkdir()  # a system folder: never part of the diff
    before = sb.snapshot_tree(tmp_path)
    (tmp_path / "change.txt").chmod(0o600)
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "link").symlink_to("/keep.txt")
    (tmp_path / "usr" / "ignored").write_text("d")
    changes, signatures = sb.diff_snapshots(before, sb.snapshot_tree(tmp_path))
    assert changes == {("/change.txt", "modified"), ("/gone.txt", "deleted"), ("/new", "added"),
                       ("/new/link", "added")}
    assert signatures["/new/link"] == "link:/keep.txt" and "/gone.txt" not in signatures


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
# Sandbox availability
# ---------------------------------------------------------------------------------------------

def test_missing_bwrap_raises_one_line(items):
    with pytest.raises(sb.SandboxUnavailable) as error:
        ne.Evaluator(items[:1], bwrap="/nonexistent/bwrap")
    assert "\n" not in str(error.value) and "bubblewrap" in str(error.value)


def test_missing_icalfa_raises_one_line(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(sb.SandboxUnavailable) as error:
        ne.load_items()
    assert "\n" not in str(error.value) and "icalfa" in str(error.value)


def test_refusing_bwrap_raises_one_line(items, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\necho more >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(sb.SandboxUnavailable) as error:
        ne.Evaluator(items[:1], bwrap=str(fake))
    assert "\n" not in str(error.value) and "Permission denied" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Containment: hostile commands, then the host is checked
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(items):
    try:
        evaluator = ne.Evaluator([item_with_gold(items, COPY_GOLD)], workers=1, timeout_s=TIMEOUT_S)
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    with evaluator:
        yield evaluator


def pid_namespaces() -> dict[int, str]:
    """{pid: PID namespace} of every host process we can see."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = os.readlink(f"/proc/{entry}/ns/pid")
            except OSError:  # the process ended meanwhile, or is not ours to inspect
                continue
    return found


@pytest.fixture
def host(tmp_path):
    """A sentinel outside the sandbox and a marker name for escape attempts; afterwards checks
    the sentinel, the marker, new /tmp entries of the sandbox's user, and leftover processes."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("untouched")
    marker = f"nl2bash-escape-{uuid.uuid4().hex}"
    tmp_before = set(os.listdir("/tmp"))
    namespaces_before = set(pid_namespaces().values())
    yield sentinel, marker
    assert sentinel.read_text() == "untouched"
    assert Path(__file__).is_file() and Path(ne.__file__).is_file()
    for folder in ("/", "/tmp", "/usr", "/etc", "/root", "/home", "/work", "/var", "/opt", str(tmp_path)):
        assert not os.path.lexists(os.path.join(folder, marker)), folder
    sandbox_uid = (sb.sandbox_identity() or (None, None))[0]  # None: the sandbox runs as us
    new_tmp = [name for name in set(os.listdir("/tmp")) - tmp_before
               if marker in name or os.lstat(f"/tmp/{name}").st_uid == sandbox_uid]
    assert new_tmp == []
    deadline = time.monotonic() + 2
    while (left := [p for p, ns in pid_namespaces().items() if ns not in namespaces_before]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "sandbox processes outlived the run"
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork


def run_hostile(sandbox: ne.Evaluator, command: str) -> tuple[dict, float]:
    started = time.monotonic()
    result = sandbox.score([command])[0]
    return result, time.monotonic() - started


def assert_isolated(sandbox: ne.Evaluator, sentinel: Path) -> None:
    """Before anything destructive runs: the sandbox must not see the host's folders."""
    result, _ = run_hostile(sandbox, f"ls /work; cat {sentinel}; ls {sentinel.parent}")
    assert "untouched" not in result["output"]
    assert result["output"].count("No such file or directory") == 3, result["output"]


def test_sandbox_sees_no_host_files(sandbox, host):
    sentinel, _ = host
    assert_isolated(sandbox, sentinel)
    result, _ = run_hostile(sandbox, "touch /usr/x /etc/x 2>&1; id -un; hostname; ulimit -u")
    assert result["output"].count("Read-only file system") == 2
    assert result["output"].split()[-3:] == ["root", sb.HOSTNAME, str(sb.MAX_PROCESSES)]


def test_rm_rf_root_is_contained(sandbox, host):
    sentinel, _ = host
    assert_isolated(sandbox, sentinel)
    result, _ = run_hostile(sandbox, f"rm -rf --no-preserve-root / 2>/dev/null; "
                                     f"rm -rf {sentinel.parent} /work /home /root /usr 2>/dev/null; ls -A /")
    assert result["reward"] < 1
    after = sandbox.score([sandbox.items[0]["gold"]])[0]
    assert after["success"], "the built tree was damaged"


def test_writes_outside_the_tree_are_contained(sandbox, host):
    sentinel, marker = host
    assert_isolated(sandbox, sentinel)
    folders = "/ /tmp /usr /etc /root /home /work /var /opt"
    result, _ = run_hostile(sandbox, f"for d in {folders}; do mkdir -p $d; echo pwned > $d/{marker}; done; "
                                     f"echo pwned > {sentinel}; ls /{marker}")
    assert f"/{marker}\n" in result["output"]  # the writes landed in its own copy of /


def test_network_is_unreachable(sandbox, host):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        result, _ = run_hostile(sandbox, f"echo hi > /dev/tcp/127.0.0.1/{port}; "
                                         f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 1)'; "
                                         "getent hosts example.com || echo no-dns")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert "Connection refused" in result["output"] and "no-dns" in result["output"]


@pytest.mark.parametrize("bomb, keeps_running", [(":(){ :|:& };:", False),
                                                  ("bomb(){ bomb | bomb & }; bomb; sleep 60", True)])
def test_fork_bomb_is_contained_and_killed(sandbox, host, bomb, keeps_running):
    result, seconds = run_hostile(sandbox, bomb)
    assert seconds < TIMEOUT_S + 3
    if keeps_running:  # the shell outlives its first fork: the process limit must bite
        assert "Resource temporarily unavailable" in result["output"]
        assert result["timed_out"] or result["truncated"]


@pytest.mark.parametrize("flood", ["yes", "cat /dev/zero", "yes > /testbed/big; ls -l /testbed/big"])
def test_output_and_file_floods_are_capped(sandbox, host, flood):
    result, seconds = run_hostile(sandbox, flood)
    if ">" in flood:  # the file-size limit stops the writer; the listing shows the capped size
        assert str(sb.MAX_FILE_BYTES) in result["output"]
    else:
        assert result["truncated"] and seconds < TIMEOUT_S
    assert len(result["output"]) <= ne.OUTPUT_KEPT_CHARS


def test_timeout_kills_the_command(sandbox, host):
    result, seconds = run_hostile(sandbox, "sleep 60 & exec >&-; sleep 60")
    assert result["timed_out"] and result["exit_code"] is None
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 3
