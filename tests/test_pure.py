"""Unit tests for the pure functions: extraction, scoring, masking, tasks, configuration."""
import json
import random

import pytest

import intrinsic_self_improvement as isi
from support import health
import support
import support.model
import support.reports
import support.tasks


@pytest.mark.parametrize("output, command", [
    ("nmap -p 22,80 10.0.0.1", "nmap -p 22,80 10.0.0.1"),
    ("nmap -sV 10.0.0.1\nThis scans versions.", "nmap -sV 10.0.0.1"),
    ("```bash\nnmap -sS 10.0.0.1\n```\nExplanation", "nmap -sS 10.0.0.1"),
    ("Here you go:\n```\n$ nikto -h http://10.0.0.1\n```", "nikto -h http://10.0.0.1"),
    ("```sh\n\n  gobuster dir -u http://x -w list\n", "gobuster dir -u http://x -w list"),
    ("`searchsploit apache 2.4.49`", "searchsploit apache 2.4.49"),
    ('"nc -zv 10.0.0.1 22"', "nc -zv 10.0.0.1 22"),
    ("$ masscan -p80 10.0.0.0/24", "masscan -p80 10.0.0.0/24"),
    ("\n\n  hydra -l root -P rockyou.txt ssh://10.0.0.1  \n", "hydra -l root -P rockyou.txt ssh://10.0.0.1"),
    ("", ""),
    ("```\n```", ""),
    ("   \n\n", ""),
])
def test_extract_command(output, command):
    assert isi.extract_command(output) == command


@pytest.mark.parametrize("command, usable", [
    ("nmap -p 22 10.0.0.1", True), ("./scan.sh", True), ("sqlmap", True), ("python3 -m http.server", True),
    ("", False), ("I'm ready to help. What's the task?", False), ("Sure, here it is", False),
    ("Task: Scan all ports of 192.168.1.1", False), ("A: Hitting the keyboard", False),
])
def test_is_usable_command(command, usable):
    assert isi.is_usable_command(command) is usable


@pytest.mark.parametrize("text, complete", [
    ("nmap -p 22", False), ("nmap -p 22\n", True), ("```bash\n", False), ("```bash\nnmap x", False),
    ("```bash\nnmap x\n", True), ("\n\n", False), ("\n  \nls\n", True), ("", False),
])
def test_first_line_complete(text, complete):
    assert isi.first_line_complete(text) is complete


@pytest.mark.parametrize("output, reconstruction", [
    ("Scan ports 22 and 80 on 10.0.0.1.", "Scan ports 22 and 80 on 10.0.0.1."),
    ("Task: Find hidden directories\nmore text", "Find hidden directories"),
    ('"List the databases"', "List the databases"), ("", ""),
])
def test_extract_reconstruction(output, reconstruction):
    assert isi.extract_reconstruction(output) == reconstruction


@pytest.mark.parametrize("output, rating", [("8", 8), ("10/10", 10), ("Rating: 7.", 7), ("0", 0),
                                             ("about 11", None), ("very similar", None), ("", None)])
def test_parse_rating(output, rating):
    assert isi.parse_rating(output) == rating


def test_word_overlap_known_values():
    assert isi.word_overlap("Scan ports 22,80 on 10.0.0.1", "scan 10.0.0.1 ports 22,80 on it") == 1.0
    assert isi.word_overlap("Scan ports 22,80 on 10.0.0.1", "scan 10.0.0.1") == pytest.approx(2 / 5)  # scan, ports, 22,80, on, 10.0.0.1
    assert isi.word_overlap("Scan ports", "") == 0.0
    assert isi.word_overlap("", "anything") == 0.0


def test_lexical_and_mix_scores():
    task = "Scan ports 22,80 on 10.0.0.1"
    assert isi.lexical_score(task, task) == pytest.approx(1.0)
    assert isi.lexical_score(task, "") == 0.0
    assert isi.mix_score(task, task, 10) == pytest.approx(1.0)
    assert isi.mix_score(task, task, None) == pytest.approx(0.5)  # a parse failure adds nothing
    partial = isi.mix_score(task, "scan 10.0.0.1", 6)
    expected = 0.2 * 0.4 + 0.3 * isi.sequence_ratio(task, "scan 10.0.0.1") + 0.5 * 0.6
    assert partial == pytest.approx(expected)
    assert 0.0 < isi.lexical_score(task, "scan 10.0.0.1") < 1.0


def test_label_masking_covers_prompt_and_padding_only():
    pad = 2  # as in SmolLM2: the pad id is the EOS id, so masking must not go by token id
    short = isi.training_example([5, 6, 7], [8, pad])
    long = isi.training_example([5, 6, 7, 9], [10, 11, 12, pad])
    batch = isi.collate([short, long], pad_id=pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, pad, pad, pad, pad], [5, 6, 7, 9, 10, 11, 12, pad]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, pad, -100, -100, -100],
                                        [-100, -100, -100, -100, 10, 11, 12, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    # the loss is taken at the positions (row-major) whose next token is labelled, with those labels
    assert batch["scored_at"].tolist() == [2, 3, 8 + 3, 8 + 4, 8 + 5, 8 + 6]
    assert batch["scored_targets"].tolist() == [8, pad, 10, 11, 12, pad]


def test_draw_tasks_is_seeded_and_never_draws_probe_tasks():
    domain = support.tasks.builtin_domain("pentest")
    probe = isi.draw_tasks(domain, 20, random.Random(1), distinct=True)
    assert len({t.text for t in probe}) == 20
    exclude = frozenset(t.text for t in probe)
    drawn = isi.draw_tasks(domain, 2000, random.Random(2), exclude=exclude)
    assert not exclude & {t.text for t in drawn}
    assert drawn[:50] == isi.draw_tasks(domain, 50, random.Random(2), exclude=exclude)
    assert all("{" not in t.text for t in drawn)


def test_draw_tasks_reports_a_domain_too_small():
    domain = {"templates": [{"task": "List files in {dir}"}], "slots": {"dir": ["/tmp", "/etc"]}}
    with pytest.raises(support.UsageError, match="cannot produce 3 distinct"):
        isi.draw_tasks(domain, 3, random.Random(0), distinct=True)


@pytest.mark.parametrize("domain, message", [
    ([], "top level must be a JSON object"),
    ({"templates": []}, "'templates' must be a non-empty list"),
    ({"templates": [{"task": "Scan {target}"}]}, r"templates\[0\] uses slot \{target\}"),
    ({"templates": [{"task": "x"}], "slots": {"target": []}}, "slots.target must be a non-empty list"),
    ({"templates": [{"tool": "nmap"}]}, r"templates\[0\] must be an object with a non-empty string 'task'"),
    ({"templates": [{"task": "x", "tol": "nmap"}]}, r"templates\[0\] has unknown key"),
    ({"templates": [{"task": "x"}], "slot": {}}, "unknown key"),
])
def test_check_domain_names_the_problem(domain, message):
    with pytest.raises(support.UsageError, match=message):
        support.tasks.check_domain(domain, "tasks.json")


def test_builtin_domain_is_valid_and_covers_the_published_tools():
    support.tasks.check_domain(support.tasks.builtin_domain("pentest"), "pentest")
    tools = {t["tool"] for t in support.tasks.builtin_domain("pentest")["templates"]}
    assert tools == {"nmap", "nikto", "gobuster", "dirb", "nc", "searchsploit", "hydra", "sqlmap", "masscan"}


def test_default_run_name_ignores_cycles_but_not_the_experiment():
    a = isi.parse_config(["--cycles", "2"])
    b = isi.parse_config(["--cycles", "20"])
    assert isi.default_run_name(a) == isi.default_run_name(b) == "smollm2-135m_pentest_seed0"
    assert isi.default_run_name(isi.parse_config(["--seed", "3"])) != isi.default_run_name(a)
    assert isi.experiment_settings(a) == isi.experiment_settings(b)


def test_published_defaults():
    cfg = isi.parse_config([])
    assert (cfg.cycles, cfg.tasks, cfg.candidates, cfg.threshold, cfg.temperature, cfg.lr, cfg.batch_size,
            cfg.output) == (10, 50, 3, 0.5, 0.7, 2e-4, 4, "./output/extended_run")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)


def test_stage_seed_differs_by_stage_and_is_stable():
    assert isi.stage_seed(0, "batch", 1) == isi.stage_seed(0, "batch", 1)
    assert len({isi.stage_seed(0, "batch", 1), isi.stage_seed(0, "batch", 2), isi.stage_seed(1, "batch", 1)}) == 3


def test_distinct_n_known_values():
    commands = [["nmap", "-p", "22"], ["nmap", "-p", "80"]]
    assert health.distinct_n(commands, 1) == pytest.approx(4 / 6)
    assert health.distinct_n(commands, 2) == pytest.approx(3 / 4)
    assert health.distinct_n([], 1) == 0.0 and health.distinct_n([["ls"]], 2) == 0.0


def test_copy_rate_counts_tokens_found_in_the_task():
    task = "Scan ports 22,80 on 10.0.0.1."
    assert health.copy_rate(task, "nmap -p 22,80 10.0.0.1") == pytest.approx(2 / 4)
    assert health.copy_rate(task, "Scan ports 22,80 on 10.0.0.1") == pytest.approx(1.0)
    assert health.copy_rate(task, "") == 0.0


def record(task, command, usable=True, score=0.0, accepted=False):
    return {"task": task, "command": command, "usable": usable, "score": score, "accepted": accepted}


def test_generation_health():
    records = [record("t1", "ls -la"), record("t1", "ls -la"), record("t1", "ls"),
               record("t2", "ls -la"), record("t2", "", usable=False)]
    measured = health.generation_health(records)
    assert measured["duplicate_rate"] == pytest.approx(2 / 4)  # the two 'ls -la' of t1; t2's is not a duplicate
    assert measured["mean_command_tokens"] == pytest.approx((2 + 2 + 1 + 2) / 4)
    assert measured["distinct_1"] == pytest.approx(2 / 7, abs=1e-4)  # rounded to 4 places


def test_select_for_training_modes():
    records = [record("t", f"cmd{i}", score=0.9 if i in (1, 4) else 0.1, accepted=i in (1, 4)) for i in range(6)] + [
        record("t", "", usable=False)]
    assert isi.select_for_training(records, "threshold", isi.resolve_signal("inversion"), random.Random(0), copies=1, threshold=0.5, floor=0.5) == [1, 4]
    assert isi.select_for_training(records, "all", isi.resolve_signal("inversion"), random.Random(0), copies=1, threshold=0.5, floor=0.5) == [0, 1, 2, 3, 4, 5]
    picks = {tuple(isi.select_for_training(records, "random", isi.resolve_signal("inversion"), random.Random(seed), copies=1, threshold=0.5, floor=0.5)) for seed in range(20)}
    assert all(len(p) == 2 and 6 not in p for p in picks) and len(picks) > 1


def test_template_patterns_recognise_template_tasks_only():
    patterns = isi.template_patterns(support.tasks.builtin_domain("pentest"))
    for task in isi.draw_tasks(support.tasks.builtin_domain("pentest"), 200, random.Random(3)):
        assert any(p.fullmatch(task.text) for p in patterns)
    assert not any(p.fullmatch("Enumerate SMB shares on the file server") for p in patterns)


def test_curve_reads_cycle_zero_from_the_initial_entry():
    history = {"probe_initial": {"mean_score": 0.1},
               "cycles": [{"cycle": 1, "probe": {"mean_score": 0.2}}, {"cycle": 2, "probe": {}}]}
    assert support.reports.curve(history, "probe", "mean_score", initial="probe_initial") == ([0, 1], [0.1, 0.2])


def test_embedded_model_cache_drops_the_gguf_quantizer_marker(tmp_path, monkeypatch):
    """Caches written before 2026-11-26 kept GGUF's quantization_config in config.json, which made
    transformers attach a GGUF quantizer to plain weights; reading such a cache removes it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tmp_path / "intrinsic-self-improvement" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")
    (target / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    assert support.model.embedded_model_dir() == target
    assert json.loads((target / "config.json").read_text()) == {"model_type": "llama"}


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (4.4, "4s"), (59.6, "1m00s"), (187, "3m07s"), (3599, "59m59s"),
                                           (3900, "1h05m"), (90061, "25h01m")])
def test_duration(seconds, text):
    assert support.reports.duration(seconds) == text
