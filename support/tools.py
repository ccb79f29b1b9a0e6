"""Do the real tools accept a command? A truth for domains of programs with option parsers (the
pentest domain's nmap, hydra, sqlmap, ...), asked of the programs themselves: each command whose
program is one of the domain's tools runs in the bubblewrap sandbox (no network namespace shared:
only a loopback that leads nowhere, so the targets in the commands are unreachable by
construction; /usr read-only, a private /tmp, 10 seconds at most) and is classified by the
tool's own output:

- accepted: the tool parsed its command line, then failed to reach its target, or started its
  work (a run past the time limit is read by what it printed until then: it had started);
- rejected: usage printed, an unknown or malformed option, a missing argument or target;
- not run: another program, shell operators (pipes, lists, redirections, substitutions), a line
  the shell's quoting rules cannot split, or a tool not installed here.

Nothing else is judged: a command the tool accepts may still do the wrong thing. docs/tools.md
lists each tool's messages and why.

    with ToolChecker(["nmap", "nc"]) as checker:
        checker.check(["nmap -sV 10.0.0.1", "nmap --bogus 10.0.0.1", "ls | wc"])
        # [{"tool_run": "nmap", "tool_verdict": "accepted", ...}, {... "rejected"}, {... "not run"}]

The rest may call: ToolChecker, program_of, classify, installed, summarize_tools, VERDICTS.
"""
import re
import shlex
import shutil

from support.sandbox import Sandbox

VERDICTS = ("accepted", "rejected", "not run")
# per command: the parsers answer in well under a second (sqlmap, the slowest to start, in 0.3 s on
# a quiet 2-core machine), scans start at once; the margin is for a loaded machine
TIMEOUT_S = 10.0
OUTPUT_KEPT = 300
SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", "<", ">", ">>", "<<", "<<<", "<&", ">&", "&>", "(",
                             ")", "|&"})

# What the tools print when their own parser refuses the command line (matched case-insensitively
# on stdout and stderr together). Messages of the option parsers they are built on: getopt
# (nmap, hydra, dirb, nc), optparse (sqlmap), cobra/pflag (gobuster), masscan's own.
REJECTED = [re.compile(p, re.I | re.M) for p in (
    r"unrecognized option", r"invalid option", r"unknown option", r"illegal option", r"no such option",
    r"option requires an argument", r"requires an argument", r"missing (a )?(mandatory )?(option|argument)",
    r"requires \d+ arguments?", r"unknown (shorthand )?flag", r"flag provided but not defined",
    r"flag needs an argument", r"required flag\(s\) .* not set",
    r"unknown command", r"^\s*usage:", r"^\s*syntax:",
    r"unknown config option", r"target IP address list empty",  # masscan
    r"invalid target definition", r"unknown service",  # hydra
    r"FATAL: Incorrect parameter", r"^dirb <url_base>",  # dirb
    r"QUITTING!",  # nmap, on an option it cannot use
    r"using 'STDIN' for parsing targets list",  # sqlmap given no target (a terminal would get its usage)
    r"invalid target details",  # sqlmap -d with a malformed connection string
)]
# nmap warns "No targets were specified" when it was given none, and also after a given target
# could not be resolved or routed; only the first is a missing argument
NMAP_TARGET_TRIED = re.compile(r"failed to resolve|failed to determine route|unable to split netmask|"
                               r"illegal netmask|no route to host", re.I)
NMAP_NO_TARGET = re.compile(r"no targets were specified", re.I)


def program_of(command: str, tools) -> tuple[str | None, str]:
    """The tool a command runs, and why not where it runs none: (tool, "") or (None, reason). A
    leading `sudo` is dropped (strip_sudo: the sandbox runs as root already)."""
    try:
        lexer = shlex.shlex(strip_sudo(command), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return None, "unparsable"
    if not words:
        return None, "empty"
    if any(w in SHELL_OPERATORS for w in words) or "$(" in command or "`" in command:
        return None, "shell operators"
    program = words[0].rsplit("/", 1)[-1]
    return (program, "") if program in tools else (None, "another program")


def classify(tool: str, output: str) -> str:
    """accepted or rejected, from what the tool printed (it ran, to its end or to the time limit)."""
    if any(p.search(output) for p in REJECTED):
        return "rejected"
    if tool == "nmap" and NMAP_NO_TARGET.search(output) and not NMAP_TARGET_TRIED.search(output):
        return "rejected"
    return "accepted"


def installed(tools) -> dict[str, bool]:
    """Which of the tools this machine has on its PATH (the sandbox sees the host's /usr)."""
    return {tool: shutil.which(tool) is not None for tool in tools}


def strip_sudo(command: str) -> str:
    """The command without a leading `sudo` (the one rule program_of and the sandbox's run share)."""
    return re.sub(r"^\s*sudo\s+", "", command)


class ToolChecker:
    """The sandbox, built once with an empty file system, and the installed tools. Use as a context
    manager. Raises support.sandbox.SandboxUnavailable where bubblewrap cannot run."""

    def __init__(self, tools, workers: int = 2, timeout_s: float = TIMEOUT_S):
        self.tools = list(tools)
        self.present = installed(self.tools)
        self.sandbox = Sandbox({"tools": ("mkdir -p /work", None)}, workers=workers, timeout_s=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        self.sandbox.close()

    @property
    def missing(self) -> list[str]:
        return [tool for tool, there in self.present.items() if not there]

    def check(self, commands: list[str]) -> list[dict]:
        """Per command: tool_run (the tool, or None), tool_verdict, tool_output (the last characters of what the
        tool printed, where the verdict is; or why it did not run) and tool_seconds."""
        found = [program_of(c, self.tools) for c in commands]
        runnable = [i for i, (tool, _) in enumerate(found) if tool is not None and self.present[tool]]
        runs = dict(zip(runnable, self.sandbox.run_all(["tools"] * len(runnable),
                                                        [strip_sudo(commands[i]) for i in runnable])))
        results = []
        for i, (tool, why) in enumerate(found):
            if i in runs:
                run = runs[i]
                verdict = classify(tool, run.output)
                results.append({"tool_run": tool, "tool_verdict": verdict, "tool_output": run.output[-OUTPUT_KEPT:],
                                "tool_seconds": run.seconds})
            else:
                results.append({"tool_run": tool, "tool_verdict": "not run",
                                "tool_output": why if tool is None else f"{tool} is not installed here",
                                "tool_seconds": 0.0})
        return results


def summarize_tools(records: list[dict]) -> dict:
    """A batch's figures: the share of all candidates the tools accept, the share of those run,
    and per tool that ran the commands run and accepted."""
    verdicts = [r["tool_verdict"] for r in records if "tool_verdict" in r]
    tools = sorted({r["tool_run"] for r in records if r.get("tool_run") and r["tool_verdict"] != "not run"})
    ran = [v for v in verdicts if v != "not run"]
    per_tool = {tool: {"run": sum(1 for r in records if r.get("tool_run") == tool and r["tool_verdict"] != "not run"),
                       "accepted": sum(1 for r in records if r.get("tool_run") == tool and r["tool_verdict"] == "accepted")}
                for tool in tools}
    return {"tools_accepted_rate": round(verdicts.count("accepted") / len(verdicts), 4) if verdicts else None,
            "tools_accepted_of_run": round(ran.count("accepted") / len(ran), 4) if ran else None,
            "tools_run": len(ran), "tools_per_tool": per_tool}
