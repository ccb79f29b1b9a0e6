"""--report-to: the figures a run and an audit write for TensorBoard, read back with TensorBoard's own
event reader and checked against progress.json and audit.json; a resumed run writes each step once;
a missing package or an unknown reporter is one line."""
import importlib.util
import json

import pytest

from conftest import one_line_error, read_progress, tiny_args

import intrinsic_self_improvement as isi
from support import tracking

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(directory) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator, tag) -> list[int]:
    return [e.step for e in accumulator.Scalars(tag)]


def value_at(accumulator, tag, step) -> float:
    return next(e.value for e in accumulator.Scalars(tag) if e.step == step)


def texts(accumulator, tag) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(f"{tag}/text_summary")}


def test_figures_are_every_number_of_a_cycle_by_its_path():
    entry = {"cycle": 2, "improvement": -0.1, "collapse": ["no commands"],
             "before": {"mean_score": 0.5, "accepted": 3, "health": {"copy_rate": 0.25}, "tools": ["x"]},
             "probe": {}, "training": {"steps": 2, "skipped": False, "loss_per_step": [1.0, 0.5]},
             "eval": None, "timing": {"before": {"generate_s": 1.5}, "cycle_s": 9.0}, "signal_up_execution_down": True}
    assert tracking.cycle_figures(entry) == {
        "before/mean_score": 0.5, "before/accepted": 3.0, "before/health/copy_rate": 0.25,
        "training/steps": 2.0, "training/skipped": 0.0, "timing/before/generate_s": 1.5, "timing/cycle_s": 9.0,
        "improvement": -0.1, "collapsed": 1.0}


def test_audit_figures_keep_intervals_apart():
    figures = {"signals": {"ladder": {"auroc": 0.9, "auroc_ci": [0.8, 0.95], "top1_ci": None, "starved": False}},
               "greedy_success": 0.05, "greedy_success_ci": [0.02, 0.08], "items": 150, "settings": {"seed": 0}}
    assert tracking.audit_figures_flat(figures) == {
        "auroc/ladder": 0.9, "auroc_low/ladder": 0.8, "auroc_high/ladder": 0.95,
        "audit/greedy_success": 0.05, "audit/greedy_success_low": 0.02, "audit/greedy_success_high": 0.08,
        "audit/items": 150.0}


def test_the_sample_table_takes_one_candidate_per_task_and_escapes_cells():
    records = [{"task": f"t{i // 2}", "command": "a | b", "reconstruction": "r\nr", "score": 0.5} for i in range(6)]
    lines = tracking.sample_table(records, candidates=2, rows=2).splitlines()
    assert lines[2:] == ["| t0 | a \\| b | r r | 0.500 |", "| t1 | a \\| b | r r | 0.500 |"]


def test_a_reporter_that_writes_nothing_computes_nothing():
    """--report-to none and a team's other processes: report_cycle returns before reading the
    cycle (empty entries would raise were they read); the writing reporters say they write."""
    assert tracking.report_cycle(tracking.Reporter(), {}, {}, [], 3) is None
    assert tracking.TensorBoard.writes and tracking.WandB.writes and not tracking.Reporter.writes


def test_a_run_writes_every_cycle_figure_once_and_a_resume_continues(tiny_model_dir, tmp_path, monkeypatch):
    args = tiny_args(tiny_model_dir, tmp_path, "--name", "tb", "--report-to", "tensorboard")
    assert isi.main(args + ["--cycles", "2"]) == 0
    # the third cycle stops after its training and fresh batch, before its progress.json
    fresh_batch = isi.fresh_batch

    def stopping(lm, embedder, sandbox, cfg, domain, index, *rest):
        if index == 4:
            raise KeyboardInterrupt
        return fresh_batch(lm, embedder, sandbox, cfg, domain, index, *rest)

    monkeypatch.setattr(isi, "fresh_batch", stopping)
    assert isi.main(args + ["--cycles", "3", "--resume"]) != 0
    monkeypatch.setattr(isi, "fresh_batch", fresh_batch)
    assert isi.main(args + ["--cycles", "3", "--resume"]) == 0

    run_dir = tmp_path / "tb"
    history = read_progress(run_dir)["history"]
    found = events(run_dir)
    tags = set(found.Tags()["scalars"])
    assert {"probe/mean_score", "before/mean_score", "after/acceptance_rate", "after/health/copy_rate",
            "training/loss_mean", "train/loss_per_step", "timing/cycle_s", "improvement"} <= tags
    for tag, key in (("probe/mean_score", "probe"), ("after/mean_score", "after"),
                     ("after/health/distinct_2", "after")):
        *path, name = tag.split("/")[1:]
        assert steps(found, tag) == ([0, 1, 2, 3] if key == "probe" else [1, 2, 3])
        for cycle in history["cycles"]:
            section = cycle[key]
            for part in path:
                section = section[part]
            assert value_at(found, tag, cycle["cycle"]) == pytest.approx(section[name], abs=1e-6)
    assert value_at(found, "probe/mean_score", 0) == pytest.approx(history["probe_initial"]["mean_score"], abs=1e-6)
    # the loss of every optimizer step, once, numbered across cycles
    per_step = [loss for c in history["cycles"] for loss in c["training"]["loss_per_step"]]
    assert steps(found, "train/loss_per_step") == list(range(1, len(per_step) + 1))
    assert [e.value for e in found.Scalars("train/loss_per_step")] == pytest.approx(per_step, abs=1e-4)
    table = texts(found, "fresh_batch")
    assert sorted(table) == [1, 2, 3] and table[3].startswith("| task | command | reconstruction | score |")
    first = json.loads((run_dir / "examples_cycle_3.jsonl").read_text().splitlines()[0])
    assert tracking.cell(first["task"]) in table[2]  # cycle 2's fresh batch is the batch cycle 3 trains on
    assert '"report_to"' not in texts(found, "config")[0]  # how a run is watched is not the experiment
    assert json.loads(texts(found, "config")[0].strip("`\n")) == history["config"]


def test_a_run_without_report_to_writes_no_event_file(tiny_model_dir, tmp_path):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--name", "plain", "--cycles", "1")) == 0
    assert not list((tmp_path / "plain").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_missing_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--report-to", "wandb")) != 0
    assert "needs the wandb package" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_an_unknown_reporter_is_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        isi.main(tiny_args(tiny_model_dir, tmp_path, "--report-to", "nosuch"))
    assert "--report-to: invalid choice: 'nosuch'" in one_line_error(capsys)
