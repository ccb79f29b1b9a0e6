"""Faults: a run killed (SIGKILL) or stopped (Ctrl-C, SIGTERM) at any moment continues to the
figures of an uninterrupted run; a damaged run directory, or one another process holds, is named in
one line; a full disk stops the run in one line and --resume goes on once space is freed."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, figures, one_line_error, read_progress, refuse_model_loading, tiny_args

import intrinsic_self_improvement as isi
import support.run_directory

CYCLES = 2
# Points of a 2-cycle tiny run (calls counted by tests/fault_runner.py): os.replace is called 17
# times (every atomic commit: cycle 0's probe, then per cycle the examples, the checkpoint's three
# files and its folder, the plot, progress.json); write_text 13 times; decode_batch 9 times.
KILLS = ([[("replace", n)] for n in range(1, 18)]
         + [[("torn", 2)], [("torn", 9)], [("adapter", 1)], [("decode", 1)], [("decode", 6)], [("train", 2)]]
         + [[("replace", 8), ("replace", 3)], [("decode", 4), ("torn", 1)]])  # killed again while continuing


@pytest.fixture(scope="module")
def runner():
    """tests/fault_runner.py: imports once, forks a child per faulted run."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_runner.py")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"

    def run_with_fault(argv, hook, at, signal, log):
        process.stdin.write(json.dumps({"argv": argv, "hook": hook, "at": at, "signal": signal, "log": str(log)}) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    yield run_with_fault
    process.stdin.close()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every trial must end at."""
    output = tmp_path_factory.mktemp("straight")
    assert isi.main(tiny_args(tiny_model_dir, output, "--cycles", str(CYCLES), "--name", "run")) == 0
    run_dir = output / "run"
    return figures(read_progress(run_dir)), sorted(p.name for p in run_dir.iterdir())


def continue_as_a_user_would(argv: list[str], run_dir: Path) -> list[str]:
    """--resume if the run directory holds progress.json, else the same command again."""
    return argv + ["--resume"] if (run_dir / "progress.json").exists() else argv


# make test-quick kills at one point; make test at every one
@pytest.mark.parametrize("kills", [kills if kills == [("replace", 10)] else pytest.param(kills, marks=pytest.mark.slow)
                                   for kills in KILLS], ids=lambda kills: "+".join(f"{hook}{at}" for hook, at in kills))
def test_a_killed_run_continues_to_the_figures_of_an_uninterrupted_one(kills, runner, straight, tiny_model_dir,
                                                                        tmp_path):
    argv = tiny_args(tiny_model_dir, tmp_path, "--cycles", str(CYCLES), "--name", "run")
    run_dir = tmp_path / "run"
    for hook, at in kills:
        result = runner(continue_as_a_user_would(argv, run_dir), hook, at, "KILL", tmp_path / "log")
        assert result["signal"] == 9, (result, (tmp_path / "log").read_text()[-2000:])
    assert isi.main(continue_as_a_user_would(argv, run_dir)) == 0
    assert figures(read_progress(run_dir)) == straight[0]
    assert sorted(p.name for p in run_dir.iterdir()) == straight[1]  # nothing half-written left behind


STOPS = [("INT", 130, "Ctrl-C"), ("TERM", 143, "SIGTERM")]  # Ctrl-C, and what a cluster's scheduler sends


@pytest.mark.parametrize("stop", STOPS, ids=lambda stop: stop[2])
@pytest.mark.parametrize("hook, at, last_completed", [pytest.param("decode", 2, None, marks=pytest.mark.slow),
                                                      pytest.param("replace", 9, None, marks=pytest.mark.slow),
                                                      ("replace", 10, 1),
                                                      pytest.param("train", 2, 1, marks=pytest.mark.slow)])
def test_ctrl_c_or_sigterm_stops_in_one_line_that_says_how_to_continue(hook, at, last_completed, stop, runner,
                                                                       straight, tiny_model_dir, tmp_path):
    signal_name, exit_code, said = stop
    argv = tiny_args(tiny_model_dir, tmp_path, "--cycles", str(CYCLES), "--name", "run")
    run_dir = tmp_path / "run"
    result = runner(argv, hook, at, signal_name, tmp_path / "log")
    assert result["exit_code"] == exit_code
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log
    stops = [line for line in log.splitlines() if line.startswith(f"stopped by {said}")]
    assert len(stops) == 1
    if last_completed is None:
        assert "before any cycle completed" in stops[0] and "run the same command" in stops[0]
    else:
        assert f"after cycle {last_completed}, saved in {run_dir}" in stops[0]
        assert stops[0].endswith(f"continue with: python intrinsic_self_improvement.py {' '.join(argv)} --resume")
    assert isi.main(continue_as_a_user_would(argv, run_dir)) == 0
    assert figures(read_progress(run_dir)) == straight[0]


def test_a_run_directory_in_use_is_refused_in_one_line_before_anything_loads(one_cycle_run, capsys, monkeypatch):
    """The same run started twice at once: the second start says so and leaves the first alone."""
    run_dir, resume = one_cycle_run
    holder = support.run_directory.hold_run_directory(run_dir)  # another process's open file, as far as flock goes
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    try:
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
        refuse_model_loading(monkeypatch)
        capsys.readouterr()
        assert isi.main(resume) == 2
        line = one_line_error(capsys)
        assert f"{run_dir} is in use by another process (pid {os.getpid()})" in line and "another --name" in line
        assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    finally:
        holder.close()
    support.run_directory.hold_run_directory(run_dir).close()  # released with its file: free again


@pytest.fixture
def one_cycle_run(tiny_model_dir, tmp_path):
    """A finished 1-cycle run and the arguments that continue it to 2 cycles."""
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "run")) == 0
    return tmp_path / "run", tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "run", "--resume")


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "progress.json").write_text((run / "progress.json").read_text()[:200]),
     r"progress.json is damaged \(JSONDecodeError.*restore the file, or start again with another --name"),
    (lambda run: (run / "progress.json").write_text(""), "progress.json is damaged"),
    (lambda run: shutil.rmtree(run / "checkpoint_cycle_1"),
     r"checkpoint_cycle_1 is missing; the run cannot go on after cycle 1 without it"),
    (lambda run: (run / "checkpoint_cycle_1" / "adapter_model.safetensors").write_bytes(b""),
     r"adapter_model.safetensors is damaged \(ValueError: empty or truncated\)"),
    (lambda run: (run / "checkpoint_cycle_1" / "adapter_model.safetensors").write_bytes(
        (run / "checkpoint_cycle_1" / "adapter_model.safetensors").read_bytes()[:-100]),
     r"adapter_model.safetensors is damaged \(ValueError: \d+ bytes, the header describes \d+\)"),
    (lambda run: (run / "checkpoint_cycle_1" / "pending_batch.jsonl").unlink(), r"pending_batch.jsonl is missing"),
    (lambda run: (run / "checkpoint_cycle_1" / "training_pool.jsonl").write_text('{"task": '),
     r"training_pool.jsonl is damaged"),
])
def test_a_damaged_run_directory_is_named_before_the_model_loads(damage, message, one_cycle_run, capsys, monkeypatch):
    run_dir, resume = one_cycle_run
    damage(run_dir)
    refuse_model_loading(monkeypatch)
    capsys.readouterr()
    assert isi.main(resume) == 2
    assert pytest.importorskip("re").search(message, one_line_error(capsys))


def test_a_run_with_no_completed_cycle_restarts_with_either_command(tiny_model_dir, tmp_path, capsys):
    argv = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "run")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "probe_cycle_0.jsonl").write_text('{"half": ')
    (run_dir / "checkpoint_cycle_1.tmp").mkdir()
    assert isi.main(argv + ["--resume"]) == 0
    assert "stopped before its first cycle completed; starting it over" in capsys.readouterr().out
    assert read_progress(run_dir)["last_completed_cycle"] == 1
    assert not (run_dir / "checkpoint_cycle_1.tmp").exists()


def small_file_system_available() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return shutil.which("unshare") is not None and probe.returncode == 0


@pytest.mark.slow
def test_disk_full_stops_in_one_line_and_resume_goes_on_once_space_is_freed(straight, tiny_model_dir, tmp_path):
    """On a 4 MiB file system (its own mount namespace) holding a filler file: the run stops when
    the disk fills, with progress.json intact; the filler is removed and --resume finishes."""
    if not small_file_system_available():
        pytest.skip("cannot mount a small file system here (unshare -Urm with tmpfs refused)")
    mount = tmp_path / "small"
    mount.mkdir()
    argv = tiny_args(tiny_model_dir, mount, "--cycles", str(CYCLES), "--name", "run")
    run = f"{sys.executable} {ROOT / 'intrinsic_self_improvement.py'}"
    # leaves 300 KiB: a cycle of this run writes ~200 KiB (checkpoint ~90, plot ~95), so one fits, two do not
    script = f"""
        mount -t tmpfs -o size=4m tmpfs {mount} || exit 90
        head -c $((4 * 1024 * 1024 - 300 * 1024)) /dev/zero > {mount}/filler
        {run} {' '.join(argv)} > {tmp_path}/first.out 2> {tmp_path}/first.err
        echo $? > {tmp_path}/first.code
        cp {mount}/run/progress.json {tmp_path}/progress_after_failure.json 2>/dev/null
        rm {mount}/filler
        {run} {' '.join(argv)} --resume > {tmp_path}/second.out 2> {tmp_path}/second.err || exit 91
        cp {mount}/run/progress.json {tmp_path}/progress_final.json
    """
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stderr, (tmp_path / "second.err").read_text()[-3000:])
    assert (tmp_path / "first.code").read_text().strip() == "2"
    error = (tmp_path / "first.err").read_text().strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: no space left on the device"), error
    saved = json.loads((tmp_path / "progress_after_failure.json").read_text())
    assert 1 <= saved["last_completed_cycle"] < CYCLES
    assert f"after cycle {saved['last_completed_cycle']}" in error[0] and error[0].endswith("--resume")
    assert figures(json.loads((tmp_path / "progress_final.json").read_text())) == straight[0]
