"""support/sandbox.py: the file-system snapshot and its diff, a missing or refusing bubblewrap
said in one line, and containment: hostile commands (host files read, rm -rf /, writes outside
the tree, the network, fork bombs, output and file floods, a command past its time), each
checked against the host afterwards. They run in the NL2Bash evaluator's sandbox on one item's
file system (the items and the time limit: conftest.py)."""
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import COPY_GOLD, TIMEOUT_S, item_with_gold, sandbox_unavailable

from support import nl2bash as ne
from support import sandbox as sb


# ---------------------------------------------------------------------------------------------
# What a command changed: the snapshot of a tree and its diff
# ---------------------------------------------------------------------------------------------

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
# Sandbox availability
# ---------------------------------------------------------------------------------------------

def test_missing_bwrap_raises_one_line(items):
    with pytest.raises(sb.SandboxUnavailable) as error:
        ne.Evaluator(items[:1], bwrap="/nonexistent/bwrap")
    assert "\n" not in str(error.value) and "bubblewrap" in str(error.value)


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
