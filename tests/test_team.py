"""One run across two processes on the CPU (gloo), started by torchrun and by accelerate launch:
the same seed and number of processes give the same figures, straight or resumed; only the
main process writes, each file once; a failure in one process stops both, in one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, figures, read_progress, tiny_args
import intrinsic_self_improvement as isi
import support.model
import support.run_directory

RUNNER = str(ROOT / "tests" / "team_runner.py")
LAUNCH_TIMEOUT_S = 150  # a launch takes 10-20 s here; a hung collective must fail the test, not stall it

pytestmark = pytest.mark.slow  # processes started by launchers: a minute and more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str], log: Path, **env) -> subprocess.CompletedProcess:
    """The CLI in two processes (tests/team_runner.py logs the files each commits to log.<rank>)."""
    command = {
        # "--" as README.md writes it: torchrun would take --signal for its --signals-to-handle
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(free_port())],
    }[launcher]
    return subprocess.run(command + [RUNNER, *args], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          cwd=ROOT, env=os.environ | {"COMMIT_LOG": str(log), "HF_HUB_OFFLINE": "1"} | env)


def committed(log: Path, run_dir: Path) -> list[str]:
    return [str(Path(line).relative_to(run_dir)) for line in log.read_text().splitlines()]


def records(run_dir: Path) -> dict:
    """Every record of every cycle file, less wall-clock timings."""
    def strip(row: dict) -> dict:
        row.pop("seconds", None)
        if isinstance(row.get("execution"), dict):
            row["execution"].pop("seconds")
        return row
    return {path.name: [strip(json.loads(line)) for line in path.read_text().splitlines()]
            for path in sorted(run_dir.glob("*_cycle_*.jsonl"))}


def run_args(model_dir, output, cycles: int, *extra) -> list[str]:
    return tiny_args(model_dir, output, "--domain", "bash", "--signal", "inversion", "--eval", "nl2bash",
                     "--eval-limit", "4", "--name", "team", "--cycles", str(cycles), *extra)


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, tmp_path_factory) -> dict:
    """3 cycles straight (accelerate launch); 2 cycles then resumed to 3 (torchrun); and the same
    settings in one process, in this one, with its commits logged."""
    root = tmp_path_factory.mktemp("team")
    straight = launch("accelerate", run_args(tiny_model_dir, root / "straight", 3), root / "straight.log")
    watched = ("--report-to", "tensorboard")
    first = launch("torchrun", run_args(tiny_model_dir, root / "resumed", 2, *watched), root / "resumed.log")
    resumed = launch("torchrun", run_args(tiny_model_dir, root / "resumed", 3, "--resume", *watched),
                     root / "resumed.log")
    alone_log, commit = [], support.run_directory.commit

    def logged_commit(partial: Path, path: Path) -> None:
        alone_log.append(str(path.relative_to(root / "alone" / "team")))
        commit(partial, path)

    support.run_directory.commit = logged_commit
    try:
        assert isi.main(run_args(tiny_model_dir, root / "alone", 3)) == 0
    finally:
        support.run_directory.commit = commit
    return {"root": root, "straight": straight, "first": first, "resumed": resumed, "alone_log": alone_log}


def test_two_processes_give_the_same_figures_straight_or_resumed(two_process_runs):
    root = two_process_runs["root"]
    for key in ("straight", "first", "resumed"):
        assert two_process_runs[key].returncode == 0, two_process_runs[key].stderr[-3000:]
    straight, resumed = root / "straight" / "team", root / "resumed" / "team"
    assert figures(read_progress(straight)) == figures(read_progress(resumed))
    assert records(straight) == records(resumed)
    assert read_progress(straight)["history"]["compute"]["processes"] == [2, 2, 2, 2]
    # the work was shared: execution and evaluation results are there for every record
    examples = records(straight)["examples_cycle_3.jsonl"]
    assert len(examples) == 3 * 2 * 2 + 2 and all("verdict" in r for r in examples)
    assert len(records(straight)["eval_cycle_3.jsonl"]) == 4


def test_only_the_main_process_writes_each_file_once(two_process_runs):
    root = two_process_runs["root"]
    assert not (root / "straight.log.1").exists() and not (root / "resumed.log.1").exists()
    straight = committed(root / "straight.log.0", root / "straight" / "team")
    assert straight == two_process_runs["alone_log"]  # the files of a one-process run, in its order
    assert sorted(p.name for p in (root / "straight" / "team").iterdir()) == \
        sorted(p.name for p in (root / "alone" / "team").iterdir())
    # one process prints: the run's lines appear once
    out = two_process_runs["straight"].stdout
    assert out.count("cycle 2/3") == 1 and out.count("; 2 processes") == 1


def test_a_team_writes_one_set_of_events(two_process_runs):
    """--report-to tensorboard in both launches of the resumed run: one event file per launch (the
    main process's), each cycle's step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = two_process_runs["root"] / "resumed" / "team"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    found = EventAccumulator(str(run_dir))
    found.Reload()
    assert [e.step for e in found.Scalars("after/mean_score")] == [1, 2, 3]
    assert [e.step for e in found.Scalars("eval/success_rate")] == [0, 1, 2, 3]
    history = read_progress(run_dir)["history"]
    assert [e.value for e in found.Scalars("eval/success_rate")] == pytest.approx([
        history["eval_initial"]["success_rate"], *(c["eval"]["success_rate"] for c in history["cycles"])], abs=1e-6)


def test_one_process_records_one_process(two_process_runs):
    alone = read_progress(two_process_runs["root"] / "alone" / "team")
    assert alone["history"]["compute"]["processes"] == [1, 1, 1, 1]


def test_a_failing_process_stops_both_in_one_line(tiny_model_dir, tmp_path):
    done = launch("torchrun", run_args(tiny_model_dir, tmp_path / "run", 2), tmp_path / "log", FAIL_RANK="1")
    assert done.returncode != 0
    assert "RuntimeError: failure injected into process 1" in done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: another process of this run failed (its message is above); stopped before any cycle "
                    "completed; run the same command to start again"], done.stderr[-3000:]
    assert not (tmp_path / "run" / "team" / "progress.json").exists()


def test_bad_input_is_said_once_by_a_team(tiny_model_dir, tmp_path):
    done = launch("torchrun", run_args(tiny_model_dir, tmp_path / "run", 2, "--threshold", "2"), tmp_path / "log")
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == [
        "error: --threshold must be in [0, 1], got 2.0"]


def test_shares_of_a_batch_sum_to_its_loss_and_gradient(tiny_model_dir):
    """What two processes compute for one batch (then sum) is what one computes for all of it."""
    import torch
    lm = support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--precision", "fp32"]))
    lm.model.eval()  # no dropout: each call sees the same network
    batch = [isi.command_example(lm.tokenizer, isi.Task(task), command) for task, command in [
        ("List /tmp", "ls /tmp"), ("Count lines of a.txt", "wc -l a.txt"), ("Show the date", "date -u +%F"),
        ("Find logs under /var", "find /var -name '*.log'"), ("Print hello", "echo hello")]]
    params = [p for p in lm.model.parameters() if p.requires_grad]
    with torch.no_grad():  # B is zero at initialisation, which would leave A's gradient zero
        for p in params:
            p.normal_(0, 0.05)

    def loss_and_gradient(shares):
        lm.model.zero_grad(set_to_none=True)
        total = 0.0
        for share in shares:
            loss, n, positions = isi.share_loss(lm.model, batch, share, lm.tokenizer.pad_token_id, "cpu")
            if loss is not None:
                loss.backward()
                total += loss.item()
        return total, torch.cat([p.grad.flatten() for p in params])

    whole, whole_grad = loss_and_gradient([batch])
    mean, _ = isi.completion_loss(lm.model, {k: v for k, v in isi.collate(batch, lm.tokenizer.pad_token_id).items()})
    assert whole == mean.item()  # one process: exactly the batch's mean loss
    for size in (2, 3, 6):  # 6 processes for 5 examples: one has none
        team_loss, team_grad = loss_and_gradient([batch[rank::size] for rank in range(size)])
        assert team_loss == pytest.approx(whole, rel=1e-5)
        assert torch.allclose(team_grad, whole_grad, rtol=1e-4, atol=1e-7)


def test_an_audit_split_across_two_processes(tiny_model_dir, tmp_path):
    """Two processes share the items and candidates; the main one writes each file; the greedy
    candidates (the same in any split) and every truth match an audit in one process."""
    args = ["audit", "--model", str(tiny_model_dir), "--name", "a", "--eval-limit", "4", "--candidates", "2",
            "--chunk-items", "2", "--max-command-tokens", "6", "--max-inversion-tokens", "6", "--bootstrap", "20"]
    done = launch("torchrun", args + ["--output", str(tmp_path / "team")], tmp_path / "log")
    assert done.returncode == 0, done.stderr[-2000:]
    assert isi.main(args + ["--output", str(tmp_path / "alone")]) == 0
    assert committed(tmp_path / "log.0", tmp_path / "team" / "a").count("audit_candidates.jsonl") == 2
    assert not (tmp_path / "log.1").exists() or not (tmp_path / "log.1").read_text()

    def greedy(root):
        rows = [json.loads(line) for line in (root / "a" / "audit_candidates.jsonl").read_text().splitlines()]
        return [(r["item"], r["command"], r["reward"], r["success"], r["signals"]["ladder"])
                for r in rows if r["greedy"]]
    assert len(greedy(tmp_path / "team")) == 4 and greedy(tmp_path / "team") == greedy(tmp_path / "alone")
    assert json.loads((tmp_path / "team" / "a" / "audit.json").read_text())["items"] == 4
