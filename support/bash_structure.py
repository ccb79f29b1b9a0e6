"""A bash command's structure: its utilities in order of appearance (command substitutions,
pipelines, and the commands that find -exec and xargs run included), each with its set of flags,
parsed with bashlex. Used by the NL2Bash benchmark's NLC2CMD metric (support/nl2bash.py) and by
the execution ladder's first level, whether a command parses (the loop's signals and the audit).

bashlex loops forever on a few malformed inputs, so every parse runs in a worker process that
is killed past a deadline (PARSE_TIMEOUT_S): a command that cannot be parsed in time counts as
one that cannot be parsed. Needs bashlex (imported in the worker only).

    from support.bash_structure import command_structure
    command_structure("find . -print0 | xargs -0 wc -l")
    # [("find", frozenset({"-print0"})), ("xargs", frozenset({"-0"})), ("wc", frozenset({"-l"}))]

The rest may call: command_structure, and PARSE_TIMEOUT_S (its deadline). parse_worker is the
worker process's entry point, and structure_in_process (no deadline) is for that worker only.
"""
import json
import select
import subprocess
import sys
import threading
from pathlib import Path

PARSE_TIMEOUT_S = 1.0  # bashlex loops forever on a few malformed inputs, e.g. '${!'1


def parse_worker() -> None:
    """Answer command_structure requests, one JSON line each way, until stdin closes."""
    import bashlex  # noqa: F401  (imported before "ready", so the first parse is not slower)
    print("ready", flush=True)
    for line in sys.stdin:
        structure = structure_in_process(json.loads(line))
        print(json.dumps(structure and [[utility, sorted(flags)] for utility, flags in structure]), flush=True)


class BoundedParser:
    """bashlex in a worker process. bashlex loops forever on a few malformed inputs ('${!'1),
    and only a process can be stopped from outside whatever the loop is doing: an in-process
    tracer or signal handler can be removed, delayed or swallowed. The worker lives across
    calls (starting one costs ~0.2 s); a parse past PARSE_TIMEOUT_S kills it, and the next call
    starts a new one. It runs in a session of its own, so Ctrl-C reaches only the parent, and
    it exits when the parent closes the pipe or dies. Thread-safe."""

    def __init__(self, timeout_s: float = PARSE_TIMEOUT_S, start_timeout_s: float = 60.0):
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.lock = threading.Lock()
        self.process = None

    def start(self) -> None:
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); " \
               "from support import bash_structure; bash_structure.parse_worker()"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        start_new_session=True, text=True)
        # start-up is bounded on its own: a busy machine may take seconds to start Python
        if self.answer(self.start_timeout_s) != "ready":
            self.stop()
            raise RuntimeError(f"the bashlex worker did not start in {self.start_timeout_s:.0f} s")

    def answer(self, timeout_s: float) -> str | None:
        """The worker's next line, or None when it has none within timeout_s."""
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        return self.process.stdout.readline().rstrip("\n") if readable else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
        self.process = None

    def send(self, command: str) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def structure(self, command: str) -> list[tuple[str, frozenset]] | None:
        """command_structure of the command, or None when bashlex fails or runs past the deadline."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.stop()
                self.start()
            try:
                self.send(command)
            except BrokenPipeError:  # the worker died since the check: once more, with a new one
                self.stop()
                self.start()
                self.send(command)
            reply = self.answer(self.timeout_s)
            if not reply:  # past the deadline (or the worker died): a fresh worker next time
                self.stop()
                return None
            structure = json.loads(reply)
            return structure and [(utility, frozenset(flags)) for utility, flags in structure]


PARSER = BoundedParser()


# Utilities whose options are whole words after one dash (find -name), not bundles of letters.
WORD_OPTION_UTILITIES = frozenset({"find"})


# Each of these find actions runs the command that follows it, up to ';' or '+'.
FIND_EXEC_ACTIONS = frozenset({"-exec", "-execdir", "-ok", "-okdir"})


# xargs options that take the next word as their argument.
XARGS_OPTIONS_WITH_ARGUMENT = frozenset({"-a", "-d", "-E", "-I", "-L", "-n", "-P", "-s"})


def option_flags(utility: str, word: str) -> list[str]:
    """Flags named by one word: '-la' -> ['-l', '-a'], '-k2' -> ['-k'], '--color=auto' ->
    ['--color'], find's '-name' -> ['-name']; [] for an operand (find's '-30' included)."""
    if word.startswith("--") and len(word) > 2:
        return [word.split("=", 1)[0]]
    if not word.startswith("-") or len(word) < 2:
        return []
    if utility in WORD_OPTION_UTILITIES:
        return [word] if word[1].isalpha() and word[1:].replace("_", "").isalnum() else []
    letters = ""
    for char in word[1:]:
        if not char.isalpha():
            break
        letters += char
    return [f"-{c}" for c in letters] if letters else [word]


def split_invocations(words: list[str]) -> list[tuple[str, frozenset]]:
    """(utility, flags) for a simple command's words, with the commands that find -exec and
    xargs run counted as utilities of their own, in order."""
    utility, rest = words[0].rsplit("/", 1)[-1], words[1:]
    flags, invocations = set(), []
    i = 0
    while i < len(rest):
        word = rest[i]
        if utility == "find" and word in FIND_EXEC_ACTIONS:
            flags.add(word)
            end = i + 1
            while end < len(rest) and rest[end] not in (";", "+"):
                end += 1
            if end > i + 1:
                invocations.extend(split_invocations(rest[i + 1:end]))
            i = end + 1
            continue
        if utility == "xargs" and not word.startswith("-"):
            invocations.extend(split_invocations(rest[i:]))
            break
        flags.update(option_flags(utility, word))
        skip_argument = utility == "xargs" and word in XARGS_OPTIONS_WITH_ARGUMENT
        i += 2 if skip_argument else 1
    return [(utility, frozenset(flags))] + invocations


def command_structure(command: str) -> list[tuple[str, frozenset]] | None:
    """Utilities in order of appearance (command substitutions and pipelines included), each
    with its flag set; None when bashlex cannot parse the command within PARSE_TIMEOUT_S."""
    return PARSER.structure(command) if command.strip() else None


def structure_in_process(command: str) -> list[tuple[str, frozenset]] | None:
    """command_structure without a deadline: only for the bounded worker process."""
    import bashlex  # imported here so that importing this module costs nothing

    try:
        trees = bashlex.parse(command)
    except Exception:  # bashlex fails on malformed input with assorted internal errors
        return None      # (ParsingError, NotImplementedError, AttributeError, TypeError seen)
    simple_commands = []

    def visit(node):
        if node.kind == "command":
            words = [part.word for part in node.parts if part.kind == "word"]
            if words:
                simple_commands.append((node.pos[0], words))
        for name in ("parts", "list"):
            for child in getattr(node, name, None) or []:
                visit(child)
        for name in ("command", "output"):
            child = getattr(node, name, None)
            if isinstance(child, bashlex.ast.node):  # a redirect's output may be an fd number
                visit(child)

    for tree in trees:
        visit(tree)
    return [inv for _, words in sorted(simple_commands, key=lambda c: c[0]) for inv in split_invocations(words)]
