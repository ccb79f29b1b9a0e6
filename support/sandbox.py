"""The bubblewrap sandbox: file systems built by setup scripts, every command run in a fresh
copy of its file system, with no network, /usr read-only, a private /tmp, and time, output,
process and file-size limits; the copy is diffed against the built tree afterwards.

Generated commands run nowhere else. Used by the NL2Bash evaluation (support/nl2bash.py) and by
the execution signals (the domain's own file system).

    with Sandbox({"mine": ("mkdir -p /data && echo hi > /data/a.txt", None)}) as sandbox:
        runs = sandbox.run_all(["mine", "mine"], ["cat /data/a.txt", "rm /data/a.txt"])

Needs the Debian package bubblewrap with unprivileged user namespaces allowed.

The rest may call: Sandbox, Execution, SandboxUnavailable, snapshot_tree, diff_snapshots.
"""
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path


HOSTNAME = "nl2bash"


SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# Per sandbox (its own user namespace counts only its own processes and threads). Memory is
# capped per process only: without cgroups, 64 processes could still use 64 GiB together.
MAX_PROCESSES = 64


MAX_MEMORY_BYTES = 2**30  # address space per process


MAX_FILE_BYTES = 16 * 2**20  # any one file a command writes; caps `yes > file`


TMP_BYTES = 64 * 2**20  # the private /tmp


SETUP_TIMEOUT_S = 120.0


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
