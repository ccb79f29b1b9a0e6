"""The CLI: --help, and bad input answered in one line with exit code 2 before any model loads."""
import dataclasses
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_line_error, refuse_model_loading

import intrinsic_self_improvement as isi

SCRIPT = str(ROOT / "intrinsic_self_improvement.py")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_documents_every_flag_and_the_subcommands():
    result = cli("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(isi.Config):
        assert "--" + f.name.replace("_", "-") in result.stdout
    assert "compare RUN_DIR" in result.stdout and "audit --help" in result.stdout
    compare = cli("compare", "--help")
    assert compare.returncode == 0 and "--eval-fs" in compare.stdout
    audit = cli("audit", "--help")
    for flag in ("--candidates", "--adapter", "--from", "--judge", "--bootstrap", "--margin", "--eval-limit"):
        assert flag in audit.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["--cycles", "0"], "--cycles must be positive"),
    (["--tasks", "-3"], "--tasks must be positive"),
    (["--candidates", "0"], "--candidates must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--threshold", "1.5"], r"--threshold must be in \[0, 1\]"),
    (["--threshold", "-0.1"], r"--threshold must be in \[0, 1\]"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--temperature", "nan"], "--temperature must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--probe-tasks", "-1"], "--probe-tasks must be zero or positive"),
    (["--eval-every", "-1"], "--eval-every must be zero"),
    (["--eval-workers", "-2"], "--eval-workers must be zero"),
    (["--tasks-file", "/no/such/file.json"], "no such file"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 is for GPUs"),
    (["--precision", "fp64"], "invalid choice"),
])
def test_bad_values_are_one_line_errors(args, message, tmp_path):
    start = time.perf_counter()
    result = cli(*args, "--output", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert pytest.importorskip("re").search(message, lines[0])
    assert time.perf_counter() - start < 30  # refused before any model loads
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args", [["--scorer", "nope"], ["--unknown-flag"], ["--cycles", "x"], ["--cyc", "3"]])
def test_unknown_or_malformed_flags_are_refused(args):
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_malformed_tasks_file_names_the_problem(tmp_path):
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps({"templates": [{"task": "Scan {target}"}]}))
    result = cli("--tasks-file", str(bad), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "templates[0] uses slot {target}, which is not in 'slots'" in result.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = cli("--tasks-file", str(broken), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_without_a_run_is_refused(tmp_path):
    result = cli("--resume", "--output", str(tmp_path))
    assert result.returncode == 2
    assert "no run to resume" in result.stderr


def test_existing_run_is_never_overwritten_and_resume_checks_the_experiment(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    config = isi.experiment_settings(isi.parse_config([]))
    progress = {"last_completed_cycle": 1, "timestamp": "t", "history": {"cycles": [{"cycle": 1}], "config": config}}
    (run_dir / "progress.json").write_text(json.dumps(progress))
    (run_dir / "self_improvement_results.json").write_text("{}")  # a finished run
    before = (run_dir / "progress.json").read_text()

    result = cli("--output", str(tmp_path), "--name", "r")
    assert result.returncode == 2 and "already holds a run" in result.stderr

    result = cli("--output", str(tmp_path), "--name", "r", "--resume", "--threshold", "0.6")
    assert result.returncode == 2
    assert "threshold=0.5" in result.stderr and "0.6" in result.stderr

    result = cli("--output", str(tmp_path), "--name", "r", "--resume", "--scorer", "lexical")
    assert result.returncode == 2 and "scorer='embed'" in result.stderr

    result = cli("--output", str(tmp_path), "--name", "r", "--resume", "--cycles", "1")
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert (run_dir / "progress.json").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--model", "./models/mine"], "--model ./models/mine: no such folder"),
    (["--model", "{folder}"], "the folder holds no model \\(no config.json\\)"),
    (["--model", "{file}"], "a file; give the model's folder or a hub id"),
    (["--model", ""], "--model must not be empty"),
    (["--embedder", "/no/such/embedder"], "--embedder /no/such/embedder: no such folder"),
    (["--output", "{file}/runs"], "--output: cannot write the run directory .*Not a directory"),
    (["--output", "/proc/1/no-such/runs"], "--output: cannot write the run directory"),
    (["--eval", "nl2bash", "--eval-limit", "100000"], "--eval-limit: the limit must be between 1 and the 300 items"),
    (["--eval", "nl2bash", "--eval-limit", "301"], "--eval-limit: .*got 301"),
])
def test_bad_paths_and_values_are_one_line_errors_before_any_model_loads(args, message, tmp_path, capsys,
                                                                        monkeypatch):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "a_file").write_text("not a model")
    args = [a.format(folder=tmp_path / "empty_folder", file=tmp_path / "a_file") for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    refuse_model_loading(monkeypatch)
    assert isi.main(args) == 2
    assert pytest.importorskip("re").search(message, one_line_error(capsys))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_a_model_that_cannot_be_loaded_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    """A hub id while the hub is unreachable, an embedder that is not one: named, no traceback."""
    assert isi.main(["--model", "nobody/no-such-model", "--output", str(tmp_path)]) == 2
    assert "--model nobody/no-such-model: cannot load it" in one_line_error(capsys)
    assert isi.main(["--model", str(tiny_model_dir), "--embedder", "nobody/no-such-embedder",
                     "--output", str(tmp_path)]) == 2
    assert "--embedder nobody/no-such-embedder: cannot load it" in one_line_error(capsys)
