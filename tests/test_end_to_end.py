"""End-to-end runs: a tiny random model from a config (seconds), resume equivalence, the
embedded default (one short run). (The batched decoder against transformers' generate is in
test_decoder.py.)"""
import json
import random
import re
from pathlib import Path

import pytest
import torch

from conftest import figures, load_tiny, one_line_error, read_progress, refuse_model_loading, tiny_args

import intrinsic_self_improvement as isi
import support.model
import support.reports
import support.tasks

PUBLISHED_BATCH_KEYS = {"total_generated", "accepted", "acceptance_rate", "mean_score"}


def test_tiny_run_writes_the_run_directory(tiny_model_dir, tmp_path):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "tiny")) == 0
    run_dir = tmp_path / "tiny"
    progress = read_progress(run_dir)
    assert progress["last_completed_cycle"] == 2 and progress["timestamp"]
    history = progress["history"]
    assert [c["cycle"] for c in history["cycles"]] == [1, 2]
    for cycle in history["cycles"]:
        assert PUBLISHED_BATCH_KEYS <= set(cycle["before"]) and PUBLISHED_BATCH_KEYS <= set(cycle["after"])
        assert cycle["before"]["total_generated"] == 3 * 2
        assert cycle["improvement"] == pytest.approx(cycle["after"]["mean_score"] - cycle["before"]["mean_score"], abs=1e-4)
        assert cycle["probe"]["total_generated"] == 2
        assert cycle["training"]["pairs"] == 6 and cycle["training"]["steps"] == 3  # threshold 0 keeps all
        assert cycle["training"]["loss_first"] > 0
    assert history["total_generated"] == 12
    assert history["total_accepted"] == 12
    assert history["config"]["model"] == str(tiny_model_dir)
    # the after-batch of cycle 1 is the batch cycle 2 trains on
    assert history["cycles"][0]["after"] == history["cycles"][1]["before"]
    examples = [json.loads(line) for line in (run_dir / "examples_cycle_2.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in examples} == {"before", "after", "probe"}
    assert {"task", "command", "reconstruction", "score", "accepted"} <= set(examples[0])
    assert (run_dir / "self_improvement_results.json").exists()
    assert not list(run_dir.glob("*.tmp"))


def test_checkpoint_is_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "p")) == 0
    checkpoint = tmp_path / "p" / "checkpoint_cycle_1"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # lora_B starts at zero: it was trained


@pytest.mark.slow
def test_resume_gives_the_same_figures_as_a_straight_run(tiny_model_dir, tmp_path):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "4", "--name", "straight")) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "split")) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "4", "--name", "split", "--resume")) == 0
    straight, split = read_progress(tmp_path / "straight"), read_progress(tmp_path / "split")
    assert split["last_completed_cycle"] == 4
    assert figures(split) == figures(straight)
    assert any(c["training"]["loss_last"] != straight["history"]["cycles"][0]["training"]["loss_last"]
               for c in straight["history"]["cycles"][1:])  # the figures are not trivially constant


def test_mix_scorer_counts_rating_failures(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "mix")
    args[args.index("lexical")] = "mix"
    assert isi.main(args) == 0
    before = read_progress(tmp_path / "mix")["history"]["cycles"][0]["before"]
    # a random model rarely writes a number 0..10: failures are counted, not hidden
    scored = before["total_generated"] - before["unusable_commands"]
    assert 0 <= before["rating_parse_failures"] <= scored
    records = [json.loads(line) for line in (tmp_path / "mix" / "examples_cycle_1.jsonl").read_text().splitlines()]
    assert all("rating" in r for r in records)


def test_tasks_file_domain(tiny_model_dir, tmp_path):
    tasks_file = tmp_path / "files.json"
    tasks_file.write_text(json.dumps({"name": "files", "slots": {"dir": ["/tmp", "/var/log", "/etc"]},
                                      "templates": [{"task": "List the files in {dir}", "tool": "ls"},
                                                    {"task": "Count the lines of every file in {dir}"}]}))
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--tasks-file", str(tasks_file)) + []) == 0
    run_dir = tmp_path / f"{tiny_model_dir.name}_files_seed0"
    records = [json.loads(line) for line in (run_dir / "examples_cycle_1.jsonl").read_text().splitlines()]
    assert {r["task"].split(" in ")[0] for r in records} <= {"List the files", "Count the lines of every file"}


def test_training_leaves_the_model_as_generation_expects_it(tiny_model_dir):
    """Training switches the CPU to eager attention and dropout on; both are undone after it."""
    lm = load_tiny(tiny_model_dir)
    base = lm.model.get_base_model()
    before = base.config._attn_implementation
    task = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 1, random.Random(0))[0]
    result = isi.train_adapter(lm, isi.parse_config(["--model", str(tiny_model_dir)]), [(task, "nmap 10.0.0.1")] * 3, seed=0)
    assert result["steps"] == 1 and not result["skipped"]
    assert base.config._attn_implementation == before
    assert not lm.model.training


def test_sampling_is_seeded(tiny_model_dir):
    lm = load_tiny(tiny_model_dir)
    requests = ["Task: list files\nWrite only the ls command.", "Task: count lines\nWrite only the wc command."]
    runs = [isi.generate(lm, requests, copies=3, temperature=0.7, max_new_tokens=6, stop_at_line=True,
                         batch_size=4, seed=s, desc="t").texts for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(runs[0]) == 6


def test_controls_frozen_judge_cumulative_data_random_selection(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "controls", "--judge", "frozen",
                     "--data", "cumulative", "--select", "random")
    assert isi.main(args) == 0
    history = read_progress(tmp_path / "controls")["history"]
    first, second = history["cycles"]
    assert first["training"]["selected"] == first["before"]["accepted"]  # random keeps the threshold's count
    assert second["training"]["pairs"] == first["training"]["selected"] + second["training"]["selected"]
    # with the frozen judge, the probe's own score is the frozen one
    assert second["probe"]["mean_score"] == second["probe"]["frozen_mean_score"]
    for key in ("distinct_1", "distinct_2", "duplicate_rate", "copy_rate", "mean_command_tokens"):
        assert key in second["after"]["health"]
    assert (tmp_path / "controls" / "progress.png").stat().st_size > 10_000


def test_model_written_tasks(tiny_model_dir, tmp_path):
    lm = load_tiny(tiny_model_dir)
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--max-inversion-tokens", "12"])
    probe = frozenset(t.text for t in isi.draw_tasks(support.tasks.builtin_domain("pentest"), 5, random.Random(0), distinct=True))
    tasks, info = isi.write_tasks(lm, cfg, support.tasks.builtin_domain("pentest"), 6, random.Random(1), 7, probe)
    patterns = isi.template_patterns(support.tasks.builtin_domain("pentest"))
    assert info["tasks_kept"] == len(tasks) <= 6 and info["tasks_requested"] >= 12
    for task in tasks:
        assert 3 <= len(task.text.split()) <= 40
        assert task.text not in probe and not any(p.fullmatch(task.text) for p in patterns)
    assert len({t.text.lower() for t in tasks}) == len(tasks)


def test_compare_runs(tiny_model_dir, tmp_path):
    for seed in ("0", "1"):
        assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--seed", seed)) == 0
    runs = sorted(str(p) for p in tmp_path.iterdir() if p.is_dir())
    plot = tmp_path / "cmp.png"
    text = support.reports.compare_runs(runs, plot)
    assert "differ only by seed" in text and "(2 seeds)" in text and "±" in text
    assert plot.stat().st_size > 10_000
    assert isi.main(["compare", str(tmp_path / "missing")]) == 2
    assert "against the untrained model" not in text  # no run was evaluated
    assert isi.main(["compare", *runs, "--baseline", runs[0]]) == 2  # it holds no eval_cycle_0.jsonl



def test_compare_runs_without_a_probe(tiny_model_dir, tmp_path):
    """--probe-tasks 0 (the testbed's runs): the table shows '-' where a run measured nothing, the
    seed line leaves the probe out, the plot says so; no error."""
    for seed in ("0", "1"):
        args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--seed", seed)
        args[args.index("--probe-tasks") + 1] = "0"
        assert isi.main(args) == 0
    runs = sorted(str(p) for p in tmp_path.iterdir() if p.is_dir())
    text = support.reports.compare_runs(runs, tmp_path / "cmp.png")
    assert "None" not in text and " | - -> - | " in text
    seeds = next(line for line in text.splitlines() if "(2 seeds)" in line)
    assert "probe" not in seeds.split("(2 seeds)")[1]


@pytest.mark.parametrize("damage", ['{"history": ', "", '{"last_completed_cycle": 1}', '{"history": {"cycles": 3}}'])
def test_compare_on_a_damaged_run_is_a_one_line_error(damage, tmp_path, capsys):
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    (run_dir / "progress.json").write_text(damage)
    assert isi.main(["compare", str(run_dir)]) == 2
    assert f"compare: {run_dir / 'progress.json'} is damaged (" in one_line_error(capsys)


@pytest.mark.slow
def test_bash_domain_with_nl2bash_evaluation(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "eval", "--domain", "bash",
                     "--eval", "nl2bash", "--eval-limit", "6", "--eval-every", "2")
    assert isi.main(args) == 0
    run_dir = tmp_path / "eval"
    history = read_progress(run_dir)["history"]
    initial, (first, second) = history["eval_initial"], history["cycles"]
    assert initial["n"] == 6 and 0.0 <= initial["success_rate"] <= 1.0
    assert {"mean_reward", "nlc2cmd", "exact_match", "per_difficulty", "spearman_score_success", "seconds"} <= set(initial)
    assert first["eval"] is None and second["eval"]["n"] == 6  # every 2 cycles
    records = [json.loads(line) for line in (run_dir / "eval_cycle_2.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {"query" not in r and "task" in r and "reward" in r and "score" in r for r in records} == {True}
    assert not (run_dir / "eval_cycle_1.jsonl").exists()
    results = json.loads((run_dir / "self_improvement_results.json").read_text())
    assert results["eval_success_initial"] == initial["success_rate"]
    assert results["eval_commands"] == 12  # pooled over the two evaluations
    assert "eval_spearman_score_reward" in results
    # figures over some file systems only, recomputed from the records
    history = read_progress(run_dir)["history"]
    for groups in ((1, 2), (3, 4, 5)):
        chosen = [r for r in records if int(r["id"][2]) in groups]
        assert 0 < len(chosen) < 6
        figures_there = support.reports.eval_figures(str(run_dir), history, 2, groups)
        assert figures_there["n"] == len(chosen)
        assert figures_there["mean_reward"] == pytest.approx(sum(r["reward"] for r in chosen) / len(chosen))
    table = support.reports.compare_runs([str(run_dir)], tmp_path / "cmp.png", (3, 4, 5))
    assert "file systems 3, 4, 5" in table
    # against the untrained model (eval_cycle_0.jsonl), paired on the same items
    against = [line for line in table.splitlines() if line.startswith("  ") and "McNemar" in line]
    assert len(against) == 1 and f"({len(chosen)} items)" in against[0].replace("1 seeds, ", "")
    assert support.reports.eval_figures(str(run_dir), history, 2, None) == history["cycles"][1]["eval"]


def test_evaluation_without_a_sandbox_says_so_and_the_run_goes_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap to be found: nothing may run unsandboxed
    args = tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "nobox", "--eval", "nl2bash",
                     "--eval-limit", "3")
    assert isi.main(args) == 0
    out = capsys.readouterr().out
    assert "eval    skipped:" in out and len([l for l in out.splitlines() if "skipped:" in l]) == 2
    history = read_progress(tmp_path / "nobox")["history"]
    assert history["eval_initial"] is None and history["cycles"][0]["eval"] is None


# ---------------------------------------------------------------------------------------------
# 4-bit QLoRA on the CPU (bitsandbytes' CPU backend: the code path a GPU runs)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_bit_run_resumes_like_a_straight_run(tiny_model_dir, tmp_path):
    four_bit = ("--quantize", "4bit")
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "straight", *four_bit)) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "split", *four_bit)) == 0
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "split", "--resume", *four_bit)) == 0
    straight, split = read_progress(tmp_path / "straight"), read_progress(tmp_path / "split")
    assert straight["history"]["compute"]["weights"] == "nf4"
    assert figures(split) == figures(straight)


def test_four_bit_gradients_are_the_same_after_generation(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at an eval-mode forward, and
    that kernel has no backward: on such CPUs, training after generation would silently lose the
    gradient through every 4-bit layer. The loader keeps one layout, so generating changes nothing."""
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--quantize", "4bit", "--lora-dropout", "0"])
    lm = support.model.load_language_model(cfg)
    for name, param in lm.model.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero, which would hide the base layers' gradient
            torch.nn.init.normal_(param, std=0.1)
    pairs = [(isi.Task("List the files in /tmp"), "ls -la /tmp"), (isi.Task("Count lines in a.txt"), "wc -l a.txt")]
    batch = isi.collate([isi.command_example(lm.tokenizer, t, c) for t, c in pairs], lm.tokenizer.pad_token_id)

    def lora_gradients():
        lm.model.train()
        lm.model.zero_grad()
        isi.completion_loss(lm.model, batch)[0].backward()
        lm.model.eval()
        return {n: p.grad.clone() for n, p in lm.model.named_parameters() if "lora_" in n}

    before = lora_gradients()
    isi.generate(lm, ["List the files in /tmp"], temperature=0, max_new_tokens=4, stop_at_line=True, batch_size=4,
                 seed=0, desc="generate")
    after = lora_gradients()
    assert before.keys() == after.keys() and len(before) == 16
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-4, atol=1e-6), name


def test_four_bit_adapter_loads_onto_the_unquantised_base(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "q", "--quantize", "4bit")) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      tmp_path / "q" / "checkpoint_cycle_1")
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(trained) == 8 and all(p.abs().sum() > 0 for p in trained)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_four_bit_without_bitsandbytes_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--quantize", "4bit")) == 2
    assert "--quantize 4bit needs the package bitsandbytes==0.50.2" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Your own tasks as a table (datasets)
# ---------------------------------------------------------------------------------------------

TABLE_TASKS = ["List the files in /tmp", "Count the lines of notes.txt", "Print field 1 with awk '{print $1}' of a.csv",
               "Show the disk usage of /var", "Find files named core below /home"]


def write_table(path: Path, rows: list[dict]) -> Path:
    import pandas as pd
    frame = pd.DataFrame(rows)
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True), ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[path.suffix]()
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_table_of_plain_tasks_is_a_domain_and_only_its_task_text_is_read(suffix, tiny_model_dir, tmp_path):
    rows = [{"task": task, "tool": "awk" if "awk" in task else None, "command": f"GOLD_COMMAND_{i}", "label": 1}
            for i, task in enumerate(TABLE_TASKS)]
    table = write_table(tmp_path / f"tasks{suffix}", rows)
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "t", "--tasks-file", str(table))) == 0
    run_dir = tmp_path / "t"
    examples = [json.loads(line) for line in (run_dir / "examples_cycle_1.jsonl").read_text().splitlines()]
    assert {e["task"] for e in examples} <= set(TABLE_TASKS)  # braces kept as they are
    written = "".join(path.read_text() for path in run_dir.rglob("*.json*"))
    assert "GOLD_COMMAND" not in written and '"label"' not in written


@pytest.mark.parametrize("rows, suffix, message", [
    ([{"name": "x"}], ".csv", r"no 'task' column \(columns: name\)"),
    ([{"task": "ok"}, {"task": "  "}], ".jsonl", r"row 2: 'task' must be non-empty text"),
    ([{"task": "ok", "tool": 3}], ".jsonl", r"row 1: 'tool' must be text or empty, got 3"),
    (None, ".jsonl", r"cannot read it as a table of tasks \(ArrowInvalid: JSON parse error"),
    (None, ".parquet", r"cannot read it as a table of tasks \(ArrowInvalid"),
])
def test_a_bad_table_is_a_one_line_error_before_any_model_loads(rows, suffix, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / f"tasks{suffix}"
    if rows is None:
        path.write_text("{not a table")
    else:
        write_table(path, rows)
    refuse_model_loading(monkeypatch)
    assert isi.main(["--tasks-file", str(path), "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, one_line_error(capsys))


def test_a_hub_dataset_id_is_tried_and_an_unreachable_hub_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isi.main(["--tasks-file", "nobody/no-such-dataset", "--output", str(tmp_path)]) == 2
    assert "--tasks-file nobody/no-such-dataset: cannot read it as a table of tasks" in capsys.readouterr().err
    assert isi.main(["--tasks-file", "./no/such.csv", "--output", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
