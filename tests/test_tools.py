"""The real tools as a truth (support/tools.py): which commands reach a tool, how its own output is
read, and, in the sandbox, each installed tool on commands written for it: one it accepts, one
with an unknown flag, one missing an argument, one with a shell operator. The sandbox's network
is looked at, never used: its interfaces are read, nothing is sent."""
import json

import pytest

from conftest import needs_tool, one_line_error, read_progress, sandbox_unavailable, tiny_args
import intrinsic_self_improvement as isi
import support.reports
from support import sandbox as sb
from support import tools

# per tool: (accepted, unknown flag, missing argument); the targets are unreachable from the sandbox
COMMANDS = {
    "nmap": ("nmap -sV -p 80,443 10.0.0.1", "nmap --no-such-flag 10.0.0.1", "nmap -sS"),
    "hydra": ("hydra -l admin -p secret 10.0.0.1 ssh", "hydra -Z 10.0.0.1 ssh", "hydra -l admin"),
    "sqlmap": ("sqlmap -u 'http://10.0.0.1/item.php?id=1' --batch --dbs", "sqlmap --no-such-flag -u http://10.0.0.1/",
               "sqlmap -u"),
    "masscan": ("masscan -p80,443 10.0.0.0/24 --rate 1000", "masscan --no-such-flag 10.0.0.1", "masscan -p80"),
    "gobuster": ("gobuster dir -u http://10.0.0.1 -w /usr/share/dirb/wordlists/common.txt",
                 "gobuster dir --no-such-flag -u http://10.0.0.1 -w /usr/share/dirb/wordlists/common.txt",
                 "gobuster dir"),
    "dirb": ("dirb http://10.0.0.1 /usr/share/dirb/wordlists/common.txt", "dirb http://10.0.0.1 -Q", "dirb"),
    "nc": ("nc -zv 10.0.0.1 80", "nc -Q 10.0.0.1 80", "nc -zv"),
}


@pytest.mark.parametrize("command, expected", [
    ("nmap -sV 10.0.0.1", ("nmap", "")),
    ("sudo nmap -sS 10.0.0.1", ("nmap", "")),
    ("sudo", (None, "another program")),
    ("\"sudo\" nmap 10.0.0.1", (None, "another program")),  # a quoted sudo is not dropped, so not run
    ("/usr/bin/nmap 10.0.0.1", ("nmap", "")),
    ("nmap 10.0.0.1 | grep open", (None, "shell operators")),
    ("nmap 10.0.0.1 > scan.txt", (None, "shell operators")),
    ("nmap 10.0.0.1; ls", (None, "shell operators")),
    ("nmap $(cat targets)", (None, "shell operators")),
    ("nmap `cat targets`", (None, "shell operators")),
    ("nmap 'unclosed", (None, "unparsable")),
    ("You can use nmap to scan the host", (None, "another program")),
    ("ls -la", (None, "another program")),
    ("", (None, "empty")),
])
def test_which_commands_reach_a_tool(command, expected):
    assert tools.program_of(command, ["nmap", "nc"]) == expected


@pytest.mark.parametrize("tool, output, verdict", [
    ("nmap", "nmap: unrecognized option '--bogus'\nSee the output of nmap -h", "rejected"),
    ("nmap", "Starting Nmap 7.93\nWARNING: No targets were specified, so 0 hosts scanned.", "rejected"),
    ("nmap", "Starting Nmap 7.93\nFailed to resolve \"target.local\".\nWARNING: No targets were specified, so 0 "
             "hosts scanned.", "accepted"),
    ("nmap", "setup_target: failed to determine route to 10.0.0.1\nWARNING: No targets were specified", "accepted"),
    ("hydra", "[ERROR] Invalid target definition!", "rejected"),
    ("hydra", "[ERROR] could not connect to ssh://10.0.0.1:22 - Failed to connect", "accepted"),
    ("gobuster", "Error: unknown shorthand flag: 'u' in -u", "rejected"),
    ("gobuster", "Error: required flag(s) \"url\", \"wordlist\" not set", "rejected"),
    ("sqlmap", "Usage: python3 sqlmap [options]\n\nsqlmap: error: no such option: --bogus", "rejected"),
    ("sqlmap", "[CRITICAL] invalid target details, valid syntax is for instance 'mysql://USER:PASSWORD@DBMS_IP:"
               "DBMS_PORT/DATABASE_NAME' or 'access://DATABASE_FILEPATH'", "rejected"),
    ("masscan", "[-] FAIL: could not determine default interface", "accepted"),
    ("nc", "nc: connect to 10.0.0.1 port 80 (tcp) failed: Network is unreachable", "accepted"),
    ("nc", "usage: nc [-46CDdFhklNnrStUuvZz]", "rejected"),
    ("nc", "", "accepted"),  # nc -l, listening until the time limit
])
def test_a_tools_own_messages(tool, output, verdict):
    assert tools.classify(tool, output) == verdict


@pytest.fixture(scope="module")
def checker():
    try:
        box = tools.ToolChecker([*COMMANDS, "no-such-tool"], workers=2)
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    with box:
        yield box


@pytest.mark.parametrize("tool", sorted(COMMANDS))
def test_each_tool_in_the_sandbox(checker, tool):
    needs_tool(tool)
    accepted, unknown_flag, missing_argument = COMMANDS[tool]
    piped = f"{accepted} | tee scan.txt"
    results = checker.check([accepted, unknown_flag, missing_argument, piped])
    assert [r["tool_verdict"] for r in results] == ["accepted", "rejected", "rejected", "not run"], results
    assert [r["tool_run"] for r in results] == [tool, tool, tool, None]
    assert results[3]["tool_output"] == "shell operators"


def test_a_missing_tool_is_not_run(checker):
    assert "no-such-tool" in checker.missing
    [result] = checker.check(["no-such-tool --version"])
    assert result == {"tool_run": "no-such-tool", "tool_verdict": "not run",
                      "tool_output": "no-such-tool is not installed here", "tool_seconds": 0.0}


def test_the_sandbox_has_only_a_loopback(checker):
    """Read, not used: the interfaces of the sandbox's network namespace (/sys is not mounted in
    the sandbox; /proc/net/dev lists the same interfaces). Only `lo`, so nothing can leave."""
    [run] = checker.sandbox.run_all(["tools"], ["tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
                                                "test -e /sys/class/net && echo sys-mounted; true"])
    assert run.exit_code == 0 and run.output.split() == ["lo"]


def test_a_batch_summary():
    records = [{"tool_run": "nmap", "tool_verdict": "accepted"}, {"tool_run": "nmap", "tool_verdict": "rejected"},
               {"tool_run": None, "tool_verdict": "not run"}, {"tool_run": "nc", "tool_verdict": "accepted"}]
    assert tools.summarize_tools(records) == {
        "tools_accepted_rate": 0.5, "tools_accepted_of_run": round(2 / 3, 4), "tools_run": 3,
        "tools_per_tool": {"nc": {"run": 1, "accepted": 1}, "nmap": {"run": 2, "accepted": 1}}}


KNOWN = ["nmap -sV -p 80 10.0.0.1", "nmap --no-such-flag 10.0.0.1", "ls -la /tmp", "nmap -sS"]


@pytest.fixture
def known_commands(monkeypatch):
    """The tiny model's text picks one of KNOWN (by its length): nmap accepts one, rejects two, and
    one is another program."""
    monkeypatch.setattr(isi, "extract_command", lambda output: KNOWN[len(output) % len(KNOWN)])




def test_the_default_run_reports_what_the_tools_accept(tiny_model_dir, tmp_path, known_commands):
    """--eval auto, the default: the pentest domain names its tools, so the run reports their
    verdicts on the probe and the fresh batch every cycle, and the plot's evaluation panel has them."""
    needs_tool("nmap")
    try:
        assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "t", "--eval", "auto")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    run_dir = tmp_path / "t"
    history = read_progress(run_dir)["history"]
    examples = [json.loads(line) for line in (run_dir / "examples_cycle_2.jsonl").read_text().splitlines()]
    for record in examples:
        expected = {KNOWN[0]: "accepted", KNOWN[1]: "rejected", KNOWN[2]: "not run", KNOWN[3]: "rejected"}
        assert record["tool_verdict"] == expected[record["command"]], record
    for summary in [history["probe_initial"], *(c[k] for c in history["cycles"] for k in ("after", "probe"))]:
        assert 0 <= summary["tools_accepted_rate"] <= 1 and summary["tools_run"] >= 0
    after = [r for r in examples if r["stage"] == "after"]
    assert history["cycles"][1]["after"]["tools_accepted_rate"] == round(
        sum(r["tool_verdict"] == "accepted" for r in after) / len(after), 4)
    xs, ys = support.reports.curve(history, "probe", "tools_accepted_rate", initial="probe_initial")
    assert xs == [0, 1, 2]  # the evaluation panel's line
    # compare: the column, and the probe's verdicts paired from the untrained model to the last cycle
    table = support.reports.compare_runs([str(run_dir)], tmp_path / "compare.png")
    assert "tools accept probe 0->N" in table
    probe0 = [json.loads(line) for line in (run_dir / "probe_cycle_0.jsonl").read_text().splitlines()]
    probe2 = sorted((r for r in examples if r["stage"] == "probe"), key=lambda r: r["task"])
    start = sum(r["tool_verdict"] == "accepted" for r in probe0) / len(probe0)
    end = sum(r["tool_verdict"] == "accepted" for r in probe2) / len(probe2)
    assert f"  t: {start:.3f} -> {end:.3f} of {len(probe2)} tasks, change {end - start:+.3f}" in table


def test_the_tools_signal_keeps_what_the_tools_accept(tiny_model_dir, tmp_path, known_commands):
    needs_tool("nmap")
    try:
        assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "s", "--signal", "tools",
                                  "--eval", "none")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    examples = [json.loads(line) for line in (tmp_path / "s" / "examples_cycle_1.jsonl").read_text().splitlines()]
    before = [r for r in examples if r["stage"] == "before"]
    assert [r["selected"] for r in before] == [r["tool_verdict"] == "accepted" for r in before]


@pytest.mark.parametrize("extra, message", [
    (["--domain", "bash", "--eval", "tools"], "--eval tools runs the domain's tools, and the bash domain names none"),
    (["--eval", "tools,tools"], "--eval: none, auto, or some of nl2bash, domain, tools"),
    (["--eval", "everything"], "--eval: none, auto, or some of nl2bash, domain, tools"),
])
def test_bad_tools_requests_are_one_line(extra, message, tiny_model_dir, tmp_path, capsys):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, *extra)) == 2
    assert message in one_line_error(capsys)
