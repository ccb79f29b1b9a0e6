"""Sandboxed NL2Bash evaluation as packaged by InterCode (300 items over five file systems).

Each command, gold or generated, runs in a fresh copy of its group's file system inside
bubblewrap (no network, /usr read-only, private /tmp, time, output, process and file-size
limits). The execution reward follows InterCode's environment code: file-system changes, the
contents of changed files, and TF-IDF similarity of the output. NLC2CMD (utilities and flags,
parsed with bashlex) and whitespace-normalised exact match are reported beside it.

    from nl2bash_eval import Evaluator, load_items, summarize
    items = load_items(limit=60)
    with Evaluator(items) as evaluator:
        results = evaluator.score(commands)        # one command per item, in order
    print(summarize(results, items))

    # any file system of your own: a setup script, then commands in fresh copies of its result
    with Sandbox({"mine": ("mkdir -p /data && echo hi > /data/a.txt", None)}) as sandbox:
        runs = sandbox.run_all(["mine", "mine"], ["cat /data/a.txt", "rm /data/a.txt"])

    # self-check: score the gold commands against themselves, print timings
    python nl2bash_eval.py --limit 60

Needs the PyPI package icalfa==0.3.6 (installed with --no-deps; only its data files are read),
bashlex, scikit-learn, scipy, and the Debian package bubblewrap with user namespaces allowed.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

GROUPS = (1, 2, 3, 4, 5)  # nl2bash_fs_{group}.json and setup_nl2b_fs_{group}.sh in icalfa
ICALFA_ASSETS = "icalfa/assets"
HOSTNAME = "nl2bash"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Per sandbox (its own user namespace counts only its own processes and threads). Memory is
# capped per process only: without cgroups, 64 processes could still use 64 GiB together.
MAX_PROCESSES = 64
MAX_MEMORY_BYTES = 2**30  # address space per process
MAX_FILE_BYTES = 16 * 2**20  # any one file a command writes; caps `yes > file`
TMP_BYTES = 64 * 2**20  # the private /tmp
SETUP_TIMEOUT_S = 120.0
PARSE_TIMEOUT_S = 1.0  # bashlex loops forever on a few malformed inputs, e.g. '${!'1
OUTPUT_KEPT_CHARS = 1000  # output kept per result, for reading; the reward sees all of it

# Root entries of the sandbox that are not part of the task file system: mount points and
# the usual system folders. InterCode's .gitignore leaves them out of its diff too, but for
# /tmp (a private tmpfs here) and /mnt.
SYSTEM_DIRS = ("boot", "dev", "etc", "home", "media", "mnt", "opt", "proc", "root", "run",
               "srv", "sys", "tmp", "usr", "var")
# Merged-/usr hosts have these as symlinks into /usr; older hosts as real folders.
USR_SIBLINGS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Host files the sandbox's /etc needs: Debian's awk, python3 and others are /etc/alternatives
# links; the loader cache finds libraries outside the default paths.
HOST_ETC_ENTRIES = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d")
SANDBOX_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hostname": f"{HOSTNAME}\n",
    "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n",
    "shells": "/bin/sh\n/bin/bash\n/usr/bin/bash\n",
}


class SandboxUnavailable(Exception):
    """One-line reason the evaluation cannot run here: bwrap missing, user namespaces refused,
    icalfa missing."""


# ---------------------------------------------------------------------------------------------
# Benchmark items
# ---------------------------------------------------------------------------------------------

def icalfa_asset(relative: str) -> Path:
    """Path of a data file shipped in icalfa, found through its metadata: importing icalfa
    itself fails without its declared dependencies, which the evaluation does not need."""
    try:
        path = Path(importlib.metadata.distribution("icalfa").locate_file(f"{ICALFA_ASSETS}/{relative}"))
    except importlib.metadata.PackageNotFoundError:
        raise SandboxUnavailable("icalfa is not installed: pip install --no-deps icalfa==0.3.6") from None
    if not path.is_file():
        raise SandboxUnavailable(f"icalfa lacks {ICALFA_ASSETS}/{relative}: install icalfa==0.3.6")
    return path


def load_items(limit: int | None = None, groups: tuple[int, ...] = GROUPS) -> list[dict]:
    """The benchmark items of the given file-system groups in a fixed order (group by group, file
    order within a group), each {"id", "group", "query", "gold", "gold2", "difficulty"}.
    `limit` takes an evenly spread subset (positions floor(i * n / limit)), the same every call,
    so quick runs compare across cycles and cover every group in proportion."""
    if not groups or any(g not in GROUPS for g in groups):
        raise ValueError(f"file systems are numbered {GROUPS[0]} to {GROUPS[-1]}, got {list(groups)}")
    items = []
    for group in sorted(set(groups)):
        records = json.loads(icalfa_asset(f"datasets/nl2bash_fs_{group}.json").read_text())
        for index, record in enumerate(records):
            items.append({"id": f"fs{group}-{index:03d}", "group": group, "query": record["query"],
                          "gold": record["gold"], "gold2": record["gold2"], "difficulty": record["difficulty"]})
    if limit is None or limit == len(items):
        return items
    if not 1 <= limit <= len(items):
        raise ValueError(f"the limit must be between 1 and the {len(items)} items there are, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


# ---------------------------------------------------------------------------------------------
# Metrics (pure)
# ---------------------------------------------------------------------------------------------

def normalize_command(command: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped (inside quotes too: a model that
    changes the spacing of a quoted string rarely means something else)."""
    return " ".join(command.split())


def exact_match(command: str, references: list[str]) -> bool:
    """The command equals one of the references after whitespace normalisation."""
    return normalize_command(command) in {normalize_command(r) for r in references}


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
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); " \
               "import nl2bash_eval; nl2bash_eval.parse_worker()"
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


def structure_similarity(prediction: list, reference: list) -> float:
    """NLC2CMD S(p) for one reference: utilities compared position by position, flags by
    (2|Fc & Fp| - |Fc | Fp|) / max(1, |Fc|, |Fp|), mismatched or missing utilities cost 1."""
    length = max(len(prediction), len(reference))
    if length == 0:
        return 1.0
    total = 0.0
    for i in range(length):
        utility_p, flags_p = prediction[i] if i < len(prediction) else (None, frozenset())
        utility_c, flags_c = reference[i] if i < len(reference) else (None, frozenset())
        if utility_p is None or utility_p != utility_c:
            total -= 1.0
            continue
        if flags_p or flags_c:
            flag_score = (2 * len(flags_c & flags_p) - len(flags_c | flags_p)) / max(1, len(flags_c), len(flags_p))
        else:
            flag_score = 1.0
        total += (1.0 + flag_score) / 2
    return total / length


def nlc2cmd_score(prediction: str, references: list[str]) -> float:
    """NLC2CMD (NeurIPS 2020) score in [-1, 1], the max over the references. A prediction that
    bashlex cannot parse scores -1 (the metric has no utilities to compare); a reference that
    bashlex cannot parse (e.g. `time ...`) counts only by exact, whitespace-normalised equality.
    Flags follow an approximation of the competition's parser: bundled short flags split,
    option values dropped, find's predicates kept whole, find -exec and xargs commands counted."""
    if exact_match(prediction, references):
        return 1.0
    predicted = command_structure(prediction)
    if predicted is None:
        return -1.0
    scores = [structure_similarity(predicted, ref) for ref in map(command_structure, references) if ref is not None]
    return max(scores, default=-1.0)


@dataclasses.dataclass(frozen=True)
class Execution:
    """What one command did in its fresh file system."""
    output: str  # stdout and stderr together, as InterCode's docker exec returns them
    changes: frozenset  # {(path, "added" | "deleted" | "modified")} against the built tree
    signatures: dict  # path -> content signature, for added and modified paths
    exit_code: int | None  # None when killed
    timed_out: bool = False
    truncated: bool = False  # output passed the cap and the command was killed
    seconds: float = 0.0


def output_similarity(output: str, reference: str) -> float:
    """Cosine of the TF-IDF vectors of two outputs (scikit-learn defaults, as InterCode); exact
    equality (1 or 0) when neither has a token of two or more word characters."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        tfidf = TfidfVectorizer().fit_transform([output, reference])
    except ValueError:  # empty vocabulary
        return 1.0 if output == reference else 0.0
    return float((tfidf @ tfidf.T)[0, 1])


def reward_parts(gold_run: Execution, cand_run: Execution) -> dict:
    """InterCode's three parts: p1 file-system changes, p2 contents of the changed paths both
    runs added or modified, p3 output similarity."""
    mismatched = len(gold_run.changes ^ cand_run.changes)
    p1 = round(0.33 * (1 - math.erf(mismatched)), 2)
    common = [path for path, kind in gold_run.changes & cand_run.changes if kind != "deleted"]
    if common:
        same = sum(gold_run.signatures[path] == cand_run.signatures[path] for path in common)
        p2 = 0.33 * same / len(common)
    else:
        p2 = 0.33
    p3 = round(0.33 * output_similarity(cand_run.output, gold_run.output), 2)
    return {"p1": p1, "p2": p2, "p3": p3}


def total_reward(parts: dict) -> float:
    """0.01 + p1 + p2 + p3, in [0.01, 1]; 1 means the candidate did what the gold did."""
    return round(0.01 + parts["p1"] + parts["p2"] + parts["p3"], 6)


def intercode_reward(gold_run: Execution, cand_run: Execution) -> float:
    """InterCode's execution reward of a candidate run against the gold run."""
    return total_reward(reward_parts(gold_run, cand_run))


def is_success(reward: float) -> bool:
    """Reward 1 up to float rounding (0.01 + 0.33 * 3 is not exactly 1 in floats)."""
    return math.isclose(reward, 1.0, abs_tol=1e-6)


def spearman(xs, ys) -> float | None:
    """Spearman rank correlation; None when undefined (fewer than 2 points, constant input)."""
    from scipy.stats import spearmanr

    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs equal lengths, got {len(xs)} and {len(ys)}")
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    value = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(value) else value


def aggregate(results: list[dict]) -> dict:
    """Counts and means of one set of per-item results."""
    n = len(results)

    def mean(key):
        return sum(float(r[key]) for r in results) / n if n else None
    return {"n": n, "success_rate": mean("success"), "mean_reward": mean("reward"),
            "nlc2cmd": mean("nlc2cmd"), "exact_match": mean("exact")}


def summarize(results: list[dict], items: list[dict]) -> dict:
    """{"n", "success_rate", "mean_reward", "nlc2cmd", "exact_match", "per_difficulty":
    {difficulty: same keys}}; results and items in the same order."""
    if len(results) != len(items):
        raise ValueError(f"{len(results)} results for {len(items)} items")
    by_difficulty = {}
    for result, item in zip(results, items):
        by_difficulty.setdefault(item["difficulty"], []).append(result)
    return {**aggregate(results),
            "per_difficulty": {d: aggregate(rows) for d, rows in sorted(by_difficulty.items())}}


# ---------------------------------------------------------------------------------------------
# File-system snapshots
# ---------------------------------------------------------------------------------------------

def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or a marker when the file cannot be read."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return "unreadable"


def entry_signature(path: str, info: os.stat_result) -> str:
    """Type, permission bits and content (bytes for files, target for links). Timestamps and
    owners are left out: reading a file or touching it is not a change."""
    mode = f"{stat.S_IMODE(info.st_mode):04o}"
    if stat.S_ISLNK(info.st_mode):
        return f"link:{os.readlink(path)}"
    if stat.S_ISDIR(info.st_mode):
        return f"dir:{mode}"
    if stat.S_ISREG(info.st_mode):
        return f"file:{mode}:{file_digest(path)}"
    return f"other:{stat.S_IFMT(info.st_mode)}:{mode}"


def snapshot_tree(root: Path) -> dict[str, str]:
    """{absolute path inside the sandbox: signature} of every entry under root, system folders
    (SYSTEM_DIRS, USR_SIBLINGS) at the top left out. Symlinks are recorded, never followed."""
    snapshot = {}

    def walk(directory: str, inside: str, top: bool):
        try:
            entries = list(os.scandir(directory))
        except OSError:  # a command may leave a folder unreadable; its mode is recorded already
            return
        for entry in entries:
            if top and entry.name in SYSTEM_DIRS + USR_SIBLINGS:
                continue
            info = entry.stat(follow_symlinks=False)
            path = f"{inside}/{entry.name}"
            snapshot[path] = entry_signature(entry.path, info)
            if stat.S_ISDIR(info.st_mode):
                walk(entry.path, path, top=False)

    walk(str(root), "", top=True)
    return snapshot


def diff_snapshots(before: dict[str, str], after: dict[str, str]) -> tuple[frozenset, dict]:
    """({(path, "added" | "deleted" | "modified")}, {path: signature after} for added and
    modified paths)."""
    changes = {(p, "added") for p in after.keys() - before.keys()}
    changes |= {(p, "deleted") for p in before.keys() - after.keys()}
    changes |= {(p, "modified") for p in before.keys() & after.keys() if before[p] != after[p]}
    signatures = {p: after[p] for p, kind in changes if kind != "deleted"}
    return frozenset(changes), signatures


def remove_tree(path: Path) -> None:
    """rmtree that first gives the owner access back: a command may chmod folders to 000."""
    if not path.exists():
        return
    for directory, subdirectories, _ in os.walk(path):
        for name in subdirectories:
            child = os.path.join(directory, name)
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Sandbox
# ---------------------------------------------------------------------------------------------

def sandbox_identity() -> tuple[int, int] | None:
    """(uid, gid) the sandbox runs as on the host: nobody when we are root, since the kernel
    never applies a process limit to host root (a fork bomb would go unchecked); None means
    stay as the current, unprivileged user."""
    return (65534, 65534) if os.geteuid() == 0 else None


def identity_kwargs(identity: tuple[int, int] | None) -> dict:
    """subprocess.Popen arguments that drop to the sandbox identity (thread-safe, unlike a
    preexec_fn)."""
    if identity is None:
        return {}
    return {"user": identity[0], "group": identity[1], "extra_groups": []}


def one_line(text: str) -> str:
    """Text with every whitespace run, newlines included, as one space."""
    return " ".join(text.split())


def check_bwrap(bwrap: str, identity: tuple[int, int] | None) -> str:
    """Absolute path of a bwrap that can create the namespaces the sandbox uses; raises
    SandboxUnavailable with a one-line reason otherwise."""
    path = shutil.which(bwrap)
    if path is None:
        raise SandboxUnavailable(f"bubblewrap not found ({bwrap}): install the Debian package bubblewrap")
    # the flags the sandbox needs: some container runtimes refuse a new /proc, for one
    probe = [path, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
             "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--size", "1048576", "--tmpfs", "/tmp", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30, **identity_kwargs(identity))
    except (OSError, subprocess.SubprocessError) as error:
        raise SandboxUnavailable(f"bubblewrap ({path}) cannot run: {one_line(str(error))}") from None
    if done.returncode != 0:
        reason = one_line(done.stderr) or f"exit status {done.returncode}"
        raise SandboxUnavailable(f"bubblewrap ({path}) cannot start a sandbox here (user namespaces refused?): {reason}")
    return path


def limits_preamble() -> str:
    """Shell lines run inside the sandbox before the command. The process limit must be set
    inside: the sandbox's own user namespace then counts only its own processes."""
    return (f"ulimit -u {MAX_PROCESSES} -f {MAX_FILE_BYTES // 1024} -v {MAX_MEMORY_BYTES // 1024} || exit 126\n"
            'exec /bin/bash -c "$1"')


def bwrap_argv(bwrap: str, root: Path, etc_dir: Path, etc_binds: list[str], usr_binds: list[str],
               command: str) -> list[str]:
    """bubblewrap command line that runs `command` with `root` as / (read-write), /usr and the
    host's library folders read-only, a synthetic /etc, fresh /proc, /dev and a private /tmp,
    and no network (a new, empty network namespace)."""
    # --as-pid-1: with bwrap's own init in between, bwrap can exit before reaping that init,
    # which then lingers as a zombie of the host's init (of our own process in a container)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
            "--uid", "0", "--gid", "0", "--hostname", HOSTNAME,
            "--bind", str(root), "/", "--ro-bind", "/usr", "/usr"]
    for name in usr_binds:
        argv += ["--ro-bind", f"/{name}", f"/{name}"]
    argv += ["--ro-bind", str(etc_dir), "/etc"]
    for name in etc_binds:
        argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
             "--chdir", "/", "--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/root",
             "/bin/bash", "-c", limits_preamble(), "/bin/bash", command]
    return argv


def sandbox_init_pid(info_fd: int) -> int | None:
    """Host pid of the sandbox's PID 1, from bwrap's --info-fd JSON; None if not written yet."""
    os.set_blocking(info_fd, False)
    try:
        return int(json.loads(os.read(info_fd, 65536))["child-pid"])
    except (BlockingIOError, ValueError, KeyError):
        return None


def kill_sandbox(process: subprocess.Popen, info_fd: int) -> None:
    """SIGKILL the sandbox's PID 1 (the command's shell): its PID namespace, every process the
    command started included, dies with it, and bwrap exits and is reaped here. Killing bwrap's
    process group instead works too (--die-with-parent) but can orphan PID 1 as a zombie."""
    if process.poll() is not None:  # bwrap has exited, so its namespace is gone already
        return
    init_pid = sandbox_init_pid(info_fd)
    if init_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGKILL)
        try:
            process.wait(2)
            return
        except subprocess.TimeoutExpired:
            pass  # fall back to the process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run_bwrap(argv: list[str], timeout_s: float, output_cap: int, identity) -> tuple[bytes, int | None, bool, bool]:
    """Run a bwrap command line in a new session, reading at most output_cap bytes of
    stdout+stderr within timeout_s, and kill the sandbox on either limit.
    Returns (output, exit code or None when killed, timed_out, truncated)."""
    info_read, info_write = os.pipe()
    try:
        try:
            process = subprocess.Popen([argv[0], "--info-fd", str(info_write), *argv[1:]], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(info_write,),
                                       start_new_session=True, **identity_kwargs(identity))
        finally:
            os.close(info_write)  # bwrap holds its own copy
        output, timed_out, truncated = read_limited(process, timeout_s, output_cap)
        if timed_out or truncated:
            kill_sandbox(process, info_read)
        process.stdout.close()
        exit_code = process.wait()
    finally:
        os.close(info_read)
    return output, None if (timed_out or truncated) else exit_code, timed_out, truncated


def read_limited(process: subprocess.Popen, timeout_s: float, output_cap: int) -> tuple[bytes, bool, bool]:
    """(at most output_cap bytes of the process's stdout, timed_out, truncated): reads until
    end of output and exit, the deadline, or one byte past the cap."""
    deadline = time.monotonic() + timeout_s
    chunks, size = [], 0
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), True, False
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > output_cap:
                return b"".join(chunks)[:output_cap], False, True
    try:  # output closed; the command may still be running
        process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return b"".join(chunks), True, False
    return b"".join(chunks), False, False


# ---------------------------------------------------------------------------------------------
# Sandbox: file systems built by setup scripts, commands run in fresh copies
# ---------------------------------------------------------------------------------------------

class Sandbox:
    """File systems built once, each by a setup script run inside the sandbox; every command then
    runs in a fresh copy of its file system, which is diffed against the built one. Use as a
    context manager, or call close(). Shared by the evaluation and by training-time execution.

    setups: {name: (script text, file name to leave it under at / or None)}; workers: commands
    run in parallel; timeout_s: wall-time limit per command; output_cap: bytes of output read
    before the command is killed; bwrap: the bubblewrap binary (name or path). Raises
    SandboxUnavailable when the sandbox cannot run here. After construction: build_seconds."""

    def __init__(self, setups: dict, workers: int = 2, timeout_s: float = 5.0, output_cap: int = 64_000,
                 bwrap: str = "bwrap"):
        if workers < 1 or timeout_s <= 0 or output_cap < 1:
            raise ValueError("workers, timeout_s and output_cap must be positive")
        self.workers, self.timeout_s, self.output_cap = workers, timeout_s, output_cap
        self.identity = sandbox_identity()
        self.bwrap = check_bwrap(bwrap, self.identity)
        self.workdir = Path(tempfile.mkdtemp(prefix="bash-sandbox-"))
        try:
            # the sandbox identity (nobody, when we are root) must reach the trees to bind them
            self.workdir.chmod(0o711)
            self.usr_binds = [n for n in USR_SIBLINGS if os.path.isdir(f"/{n}") and not os.path.islink(f"/{n}")]
            self.etc_binds = [n for n in HOST_ETC_ENTRIES if os.path.exists(f"/etc/{n}")]
            self.etc_dir = self.write_etc()
            started = time.monotonic()
            self.trees = {name: self.build(index, *setup) for index, (name, setup) in enumerate(setups.items())}
            self.build_seconds = time.monotonic() - started
            self.initial = {name: snapshot_tree(tree) for name, tree in self.trees.items()}
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        """Remove the built trees and any leftover run copies."""
        if hasattr(self, "workdir"):  # absent when the sandbox check failed
            remove_tree(self.workdir)

    def own(self, path: Path) -> None:
        """Hand a path we created to the sandbox identity, so the sandbox can write to it."""
        if self.identity is not None:
            os.lchown(path, *self.identity)

    def write_etc(self) -> Path:
        """A small synthetic /etc: no host accounts or secrets, plus mount points for the few
        host entries bound over it read-only."""
        etc_dir = self.workdir / "etc"
        etc_dir.mkdir(mode=0o755)
        for name, text in SANDBOX_ETC.items():
            (etc_dir / name).write_text(text)
            (etc_dir / name).chmod(0o644)
        for name in self.etc_binds:
            if os.path.isdir(f"/etc/{name}"):
                (etc_dir / name).mkdir(mode=0o755)
            else:
                (etc_dir / name).touch(mode=0o644)
        return etc_dir

    def skeleton(self, root: Path) -> None:
        """An empty root: system folders as mount points, /bin and friends as on the host."""
        root.mkdir(mode=0o755)
        self.own(root)
        for name in SYSTEM_DIRS:
            (root / name).mkdir(mode={"root": 0o700, "tmp": 0o1777}.get(name, 0o755))
            self.own(root / name)
        for name in USR_SIBLINGS:
            host = f"/{name}"
            if os.path.islink(host):
                (root / name).symlink_to(os.readlink(host))
            elif os.path.isdir(host):
                (root / name).mkdir(mode=0o755)
            else:
                continue
            self.own(root / name)

    def build(self, index: int, script: str, keep_as: str | None) -> Path:
        """Run a setup script once inside the sandbox, into a fresh root, left at /keep_as when
        given (InterCode's image keeps its script at /, and some queries read it)."""
        root = self.workdir / f"fs{index}"
        self.skeleton(root)
        command = script
        if keep_as is not None:
            (root / keep_as).write_text(script)
            (root / keep_as).chmod(0o755)
            self.own(root / keep_as)
            command = f"bash /{keep_as}"
        argv = bwrap_argv(self.bwrap, root, self.etc_dir, self.etc_binds, self.usr_binds, command)
        output, exit_code, timed_out, _ = run_bwrap(argv, SETUP_TIMEOUT_S, 1_000_000, self.identity)
        if timed_out:
            raise RuntimeError(f"setup script {keep_as or index} did not finish in {SETUP_TIMEOUT_S:.0f} s: "
                               f"{output[-500:]!r}")
        return root

    def execute(self, name, command: str) -> Execution:
        """Run one command in a fresh copy of a built tree and diff the copy."""
        run_dir = Path(tempfile.mkdtemp(dir=self.workdir, prefix="run-"))
        try:
            run_dir.chmod(0o711)
            root = run_dir / "root"
            # cp -a keeps owners, modes and timestamps, so the copy is the built tree
            subprocess.run(["cp", "-a", "--", str(self.trees[name]), str(root)], check=True)
            # a NUL cannot reach bash through argv; bash would stop reading at it anyway
            argv = bwrap_argv(self.bwrap, root, self.etc_dir, self.etc_binds, self.usr_binds,
                              command.replace("\0", ""))
            started = time.monotonic()
            output, exit_code, timed_out, truncated = run_bwrap(argv, self.timeout_s, self.output_cap, self.identity)
            seconds = time.monotonic() - started
            changes, signatures = diff_snapshots(self.initial[name], snapshot_tree(root))
        finally:
            remove_tree(run_dir)
        return Execution(output=output.decode("utf-8", "replace"), changes=changes, signatures=signatures,
                         exit_code=exit_code, timed_out=timed_out, truncated=truncated, seconds=round(seconds, 3))

    def run_all(self, names: list, commands: list[str]) -> list[Execution]:
        """Each command in its own fresh copy of the tree named beside it, in order, across
        `workers` threads (each drives a subprocess, so threads suffice)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.execute, names, commands))


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------

class Evaluator(Sandbox):
    """The benchmark's file systems (InterCode's setup scripts, one per group), each gold command
    run once; then scores any number of candidate lists against the gold runs. Arguments as
    Sandbox's after `items`. After construction: build_seconds, gold_seconds, gold_runs (one
    Execution per item)."""

    def __init__(self, items: list[dict], **sandbox):
        self.items = list(items)
        scripts = {g: icalfa_asset(f"docker/setup_nl2b_fs_{g}.sh") for g in sorted({item["group"] for item in items})}
        # group 5's `#!/bin/sh` is BusyBox in InterCode, whose echo interprets -e like bash's,
        # not dash's: every script runs with bash
        super().__init__({g: (path.read_text(), path.name) for g, path in scripts.items()}, **sandbox)
        try:
            started = time.monotonic()
            self.gold_runs = self.run_items([item["gold"] for item in self.items])
            self.gold_seconds = time.monotonic() - started
        except BaseException:
            self.close()
            raise

    def run_items(self, commands: list[str]) -> list[Execution]:
        """One command per item, in item order."""
        return self.run_all([item["group"] for item in self.items], commands)

    def score(self, commands: list[str]) -> list[dict]:
        """One generated command per item (same order as items). Per item: id, command, reward,
        success (reward 1), nlc2cmd, exact, timed_out, truncated, exit_code, p1, p2, p3, seconds,
        and the first OUTPUT_KEPT_CHARS of the output."""
        if len(commands) != len(self.items):
            raise ValueError(f"{len(commands)} commands for {len(self.items)} items")
        results = []
        for item, command, gold_run, run in zip(self.items, commands, self.gold_runs, self.run_items(commands)):
            parts = reward_parts(gold_run, run)
            reward = total_reward(parts)
            references = [item["gold"], item["gold2"]]
            results.append({"id": item["id"], "command": command, "reward": reward, "success": is_success(reward),
                            "nlc2cmd": nlc2cmd_score(command, references), "exact": exact_match(command, references),
                            "timed_out": run.timed_out, "truncated": run.truncated, "exit_code": run.exit_code,
                            **parts, "seconds": run.seconds, "output": run.output[:OUTPUT_KEPT_CHARS]})
        return results


# ---------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Score the gold commands against themselves: a check of the sandbox and of which items
    are not reproducible (clock, processes, host state), with timings."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--limit", type=int, default=None, help="evenly spread subset of the 300 items")
    parser.add_argument("--workers", type=int, default=2, help="commands run in parallel")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per command")
    args = parser.parse_args(argv)
    try:
        items = load_items(args.limit)
    except ValueError as error:
        parser.error(f"--limit: {error}")
    try:
        evaluator = Evaluator(items, workers=args.workers, timeout_s=args.timeout)
    except SandboxUnavailable as error:
        print(f"sandbox unavailable: {error}", file=sys.stderr)
        return 2
    with evaluator:
        print(f"built {len(evaluator.trees)} file systems in {evaluator.build_seconds:.2f} s; "
              f"ran {len(items)} gold commands in {evaluator.gold_seconds:.2f} s")
        started = time.monotonic()
        results = evaluator.score([item["gold"] for item in items])
        print(f"scored {len(items)} gold commands in {time.monotonic() - started:.2f} s (workers {args.workers})")
    print(json.dumps(summarize(results, items), indent=1))
    unstable = [f"{r['id']} ({r['reward']:.2f}): {r['command']}" for r in results if not r["success"]]
    print(f"gold is not a success against itself on {len(unstable)} items", *unstable, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
