"""`audit`: the statistics against scikit-learn and scipy on constructed data; the likelihood
signals against a direct computation with a tiny model; the ladder's levels on commands written
to fail at each level, run in the bash domain's sandbox; an end-to-end audit on the tiny model,
`--from` giving the same figures, a stopped audit continuing to the same candidates; bad input
refused in one line before anything loads."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, needs_tool, one_line_error, refuse_model_loading, sandbox_unavailable

import intrinsic_self_improvement as isi
from support import audit_program
import support.decoder
import support.shellcheck
import support.tasks
from support import audit as au
from support import sandbox as sb


# ---------------------------------------------------------------------------------------------
# Statistics: known answers from scikit-learn and scipy
# ---------------------------------------------------------------------------------------------

def constructed(n=300, seed=0):
    """Scores with many ties, labels related to them, item ids of 3-5 candidates."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, n).astype(float)
    labels = rng.random(n) < 0.15 + 0.1 * scores
    return scores, labels


def test_auroc_equals_scikit_learn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score
    scores, labels = constructed()
    assert au.auroc(list(scores), list(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    rng = np.random.default_rng(1)
    weights = rng.integers(0, 4, size=(5, len(scores)))
    for row, value in zip(weights, au.auroc_draws(scores, labels, weights)):
        assert value == pytest.approx(roc_auc_score(labels, scores, sample_weight=row), abs=1e-12)
    # an abstention (None) ranks below every score
    with_none = [None if s == 0 else s for s in scores]
    assert au.auroc(with_none, list(labels)) == pytest.approx(
        roc_auc_score(labels, np.where(scores == 0, -1e9, scores)), abs=1e-12)
    assert au.auroc([1.0, 2.0], [True, True]) is None  # one class: undefined


def test_spearman_draws_equal_scipy():
    from scipy.stats import spearmanr
    scores, labels = constructed()
    reward = scores * 0.1 + np.random.default_rng(2).random(len(scores))
    index = np.random.default_rng(3).integers(0, len(scores), len(scores))
    got = au.spearman_draws(scores, reward, [np.arange(len(scores)), index])
    assert got[0] == pytest.approx(spearmanr(scores, reward).statistic, abs=1e-12)
    assert got[1] == pytest.approx(spearmanr(scores[index], reward[index]).statistic, abs=1e-12)
    assert np.isnan(au.spearman_draws(np.ones(5), np.arange(5.0), [np.arange(5)])[0])


def test_item_bootstrap_interval_agrees_with_scipy():
    """The percentile interval of a mean over items, from item_draws, against scipy's bootstrap."""
    from scipy.stats import bootstrap
    values = np.random.default_rng(4).random(200) ** 3
    counts = au.item_draws(len(values), 5000, seed=5)
    ours = au.interval((counts * values).sum(1) / counts.sum(1))
    theirs = bootstrap((values,), np.mean, n_resamples=5000, method="percentile", random_state=6).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.01) and ours[1] == pytest.approx(theirs.high, abs=0.01)
    assert counts.sum(1).tolist() == [200] * 5000


def candidate(item, signal, success=False, reward=0.5, beats=False, usable=True, greedy=False, trivial=False):
    return {"item": item, "greedy": greedy, "usable": usable, "trivial_item": trivial,
            "signals": {"s": signal}, "success": success, "reward": reward, "beats_nothing": beats}


def test_shell_complaints_are_not_output_and_broken_items_are_left_out():
    run = sb.Execution(output="/bin/bash: line 1: tree: command not found\nbash: line 2: syntax error near x\n"
                       "ls: cannot access 'a'\n", changes=frozenset(), signatures={}, exit_code=127)
    assert support.nl2bash.without_shell_complaints(run).output == "ls: cannot access 'a'\n"
    records = [candidate("a", 1.0, True, 1.0, True), candidate("a", 0.0),
               candidate("b", 1.0, True, 1.0, True) | {"gold_broken": True}, candidate("b", 0.0) | {"gold_broken": True}]
    figures = figures_of_records(records, bootstrap=10)
    assert figures["items"] == 1 and figures["broken_items_left_out"] == 1
    # beats_nothing is decided on the reward without bash's complaints, where it is recorded
    loud = [r | {"nothing_reward": 0.67, "reward": 0.8, "beats_reward": 0.67} for r in records[:2]]
    assert figures_of_records(loud, bootstrap=10)["positives"]["beats_nothing"] == 0


def test_top1_takes_the_expectation_over_a_tie():
    groups = [[candidate("a", 1, True), candidate("a", 1, False), candidate("a", 0, False)],
              [candidate("b", None, True), candidate("b", None, False)],  # scores none: a random pick
              [candidate("c", 0.2, False), candidate("c", 0.9, True)]]
    assert au.top1_values(groups, "s", "success").tolist() == [0.5, 0.5, 1.0]


def figures_of_records(records, **kw):
    """audit_figures with the signal table's rules, as the audit computes them."""
    keeps = lambda rule, values: isi.kept_in_task(rule, values, 0.5, isi.ladder_floor(True))  # noqa: E731
    return au.audit_figures(records, rules={}, keeps=keeps, threshold=0.5, shellcheck_available=True, **kw)


def test_figures_on_constructed_candidates():
    """Two items (one trivial), a signal that ranks the working candidate first on each."""
    records = [candidate("x", 0.9, True, 1.0, True), candidate("x", 0.1, False, 0.6),
               candidate("x", 0.5, False, 0.7, greedy=True),
               candidate("y", 0.8, True, 1.0, True, trivial=True), candidate("y", 0.2, True, 1.0, True, trivial=True),
               candidate("y", 0.3, False, 0.6, greedy=True, trivial=True)]
    figures = figures_of_records(records, bootstrap=50)
    s = figures["signals"]["s"]
    assert (s["auroc"], s["top1_success"], s["top1_beats_nothing"]) == (1.0, 1.0, 1.0)
    assert s["auroc_beats_nothing"] == 1.0  # positives 0.9, 0.8, 0.2 all above the negative 0.1
    assert figures["nontrivial_items"] == 1 and figures["random_top1"] == 0.5
    assert figures["greedy_success"] == 0.0 and figures["oracle_success"] == 1.0
    assert figures["positives"] == {"success_nontrivial": 1, "success_nontrivial_usable": 1, "success_trivial": 2,
                                    "beats_nothing": 3, "beats_nothing_usable": 3}
    assert s["starved"] == 0.0 and s["tied"] == 0.0
    assert s["top1_gain_beats_nothing"] == 0.25  # x: 1 - 1/2; y: 1 - 1
    # the do-nothing command's reward, where given, decides beats_nothing by the margin
    margin = [r | {"nothing_reward": r["reward"] - 0.02} for r in records]
    assert figures_of_records(margin, bootstrap=10, margin=0.05)["positives"]["beats_nothing"] == 0
    assert figures_of_records(margin, bootstrap=10, margin=0.01)["positives"]["beats_nothing"] == 4


# ---------------------------------------------------------------------------------------------
# The ladder: commands that fail at each level, in the bash domain's file system
# ---------------------------------------------------------------------------------------------

# (command, the first level it fails, or None: it climbs them all)
LADDER_COMMANDS = [
    ("echo 'unterminated", "parses"),
    ("nosuchprogram /testbed", "programs_exist"),
    ("[ -f /testbed/textfile7.txt]", "shellcheck_clean"),  # bash's [ runs, complains, exits 2
    ("grep zzz_not_there /testbed/textfile7.txt", "exits_zero"),
    ("grep -Q x /testbed/textfile7.txt || true", "no_usage_error"),
    ("true", "effect"),
    ("ls /testbed", None),
]


def test_each_level_of_the_ladder(sandbox):
    if not support.shellcheck.shellcheck_available():
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    commands = [c for c, _ in LADDER_COMMANDS]
    runs = sandbox.run_all(["domain"] * len(commands), commands)
    clean = support.shellcheck.error_free(commands)
    for (command, fails), run, ok in zip(LADDER_COMMANDS, runs, clean):
        levels = isi.execution_ladder(run, isi.nl2bash.command_structure(command) is not None, ok)
        climbed = isi.LADDER.index(fails) if fails else len(isi.LADDER)
        assert [levels[name] for name in isi.LADDER[:climbed]] == [True] * climbed, (command, levels)
        assert fails is None or levels[fails] is False, (command, levels)
        assert isi.ladder_score(levels) == pytest.approx(climbed / len(isi.LADDER)), command
    # without shellcheck its level is unavailable: skipped, and out of the count
    levels = isi.execution_ladder(runs[-2], True, None)  # `true`: climbs 4 of the 5 levels left
    assert isi.ladder_score(levels) == pytest.approx(4 / 5)


def test_missing_shellcheck_is_unavailable_not_failed(monkeypatch):
    monkeypatch.setattr(support.shellcheck, "shellcheck_available", lambda: False)
    assert support.shellcheck.error_free(["ls"]) is None
    assert isi.ladder_floor(False) == pytest.approx(3 / 5) and isi.ladder_floor(True) == pytest.approx(4 / 6)


def test_agreement_sizes_count_same_passing_results(sandbox):
    commands = ["ls /testbed", "ls /testbed", "ls  /testbed", "true", "nosuchprogram"]
    runs = sandbox.run_all(["domain"] * len(commands), commands) + [None]
    assert isi.agreement_sizes(runs) == [3, 3, 3, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Likelihood signals: against a direct computation with the tiny model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return isi.load_models(isi.Config(model=str(tiny_model_dir), scorer="lexical", lora_r=4))[0]


def direct_mean_logprob(lm, example: dict) -> float:
    """The answer's mean log-probability from one unbatched forward pass of the whole model."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].float()
    answer = [k for k, label in enumerate(example["labels"]) if label != -100]
    logprobs = torch.log_softmax(logits, -1)
    return float(np.mean([logprobs[k - 1, example["input_ids"][k]].item() for k in answer]))


def test_coder_and_reviewer_equal_a_direct_computation(tiny_lm):
    task = isi.Task("Count the lines of every .txt file under /testbed")
    commands = ["wc -l /testbed/*.txt", "find /testbed -name '*.txt' | xargs wc -l", "ls"]
    examples = [isi.command_example(tiny_lm.tokenizer, task, c) for c in commands] + [
        isi.reviewer_example(tiny_lm.tokenizer, task.text, c) for c in commands]
    batched = isi.answer_logprobs(tiny_lm, examples, batch_size=4)  # mixed lengths: padding
    for example, value in zip(examples, batched):
        assert value == pytest.approx(direct_mean_logprob(tiny_lm, example), abs=1e-4)
    # the prompt is not scored: a longer prompt with the same answer gives another value
    assert batched[0] != pytest.approx(batched[3], abs=1e-6)


def test_answers_to_one_prompt_share_its_pass_and_keep_their_values(tiny_lm, monkeypatch):
    """A task's candidates share their prompt: each distinct prompt's rest runs once for its
    answers, and each answer still gets its own direct value, whether its prompt's answers fill
    one batch or are split across two (batch size 4 for 3 prompts x 3 answers, in mixed order)."""
    tasks = [isi.Task(text) for text in ("List the files in /testbed", "Count the lines of every .txt file",
                                         "Show the disk usage of /testbed, largest first")]
    commands = ["ls /testbed", "wc -l /testbed/*.txt", "du -sh /testbed/* | sort -rh", "ls -la", "find ."]
    examples = [isi.command_example(tiny_lm.tokenizer, tasks[k % 3], commands[k % 5]) for k in range(9)]
    real, widths = tiny_lm.model.get_base_model().get_decoder().forward, []

    def watched(*args, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)
    monkeypatch.setattr(tiny_lm.model.get_base_model().get_decoder(), "forward", watched)
    values = isi.answer_logprobs(tiny_lm, examples, batch_size=4)
    monkeypatch.undo()
    for example, value in zip(examples, values):
        assert value == pytest.approx(direct_mean_logprob(tiny_lm, example), abs=1e-4)
    prompt_rows = [rows for rows, _ in widths[1::3]]  # per batch: the shared prefix, the prompts' rests, the answers
    assert sum(prompt_rows) < 9 and [rows for rows, _ in widths[2::3]] == [4, 4, 1]


def test_certainty_is_the_mean_log_probability_of_the_sampled_tokens(tiny_lm):
    """decode_batch's log-probabilities of the tokens it sampled (at temperature 0.7) are the
    model's own (temperature 1), as a direct forward pass over prompt + tokens gives them."""
    prompts = [isi.prompt_ids(tiny_lm.tokenizer, isi.command_request(isi.Task(text)))
               for text in ("List the files in /testbed", "Count the lines of /testbed/a.txt")]
    logprobs = []
    with torch.inference_mode():
        new_tokens, _, _ = support.decoder.decode_batch(
            tiny_lm, prompts, copies=2, temperature=0.7, max_new_tokens=8, line_done=None,
            generator=torch.Generator().manual_seed(1), logprobs=logprobs)
    assert [len(row) for row in logprobs] == [len(row) for row in new_tokens]
    for row, (tokens, values) in enumerate(zip(new_tokens, logprobs)):
        if tokens:
            direct = direct_mean_logprob(tiny_lm, isi.training_example(prompts[row // 2], tokens))
            assert np.mean(values) == pytest.approx(direct, abs=1e-4)
    generated = support.decoder.decode(tiny_lm, prompts, copies=2, temperature=0.7, max_new_tokens=8,
                                       batch_size=8, seed=1, desc="t", with_logprobs=True)
    assert len(generated.mean_logprobs) == 4 and all(v is None or v < 0 for v in generated.mean_logprobs)


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------------------

KNOWN = ["ls", "true", "ls -a", "find . -type f", "nosuchprogram", "Sure, here it is"]

SIGNALS = {"inversion_embed", "inversion_lexical", "inversion_mix", "certainty", "coder", "reviewer",
           "coder_reviewer", *isi.LADDER, "ladder", "execution", "agreement", "ladder_itemfs", "execution_itemfs",
           "agreement_itemfs"}

FIGURE_KEYS = {"auroc", "auroc_ci", "auroc_beats_nothing", "auroc_beats_nothing_ci", "auroc_usable",
               "auroc_usable_ci", "auroc_beats_nothing_usable", "auroc_beats_nothing_usable_ci", "spearman_reward",
               "spearman_ci", "top1_success", "top1_ci", "top1_gain_beats_nothing", "starved", "tied",
               "seconds_per_candidate"}


@pytest.fixture
def known_commands(monkeypatch):
    """The tiny model's text picks one of KNOWN (by its length): a listing succeeds on some
    items, others fail or are no command at all, as a real model's would."""
    monkeypatch.setattr(isi, "extract_command", lambda output: KNOWN[len(output) % len(KNOWN)])


def audit_args(model_dir, output, *extra):
    return ["audit", "--model", str(model_dir), "--output", str(output), "--name", "a", "--eval-limit", "6",
            "--candidates", "3", "--chunk-items", "3", "--max-command-tokens", "6", "--max-inversion-tokens", "6",
            "--bootstrap", "50", *extra]


def candidates(audit_dir) -> list[dict]:
    rows = [json.loads(line) for line in (audit_dir / "audit_candidates.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "cost"} for r in rows]


def figures_of(audit_dir) -> dict:
    result = json.loads((audit_dir / "audit.json").read_text())
    return {k: v for k, v in result.items() if k not in {"machine", "compute", "wall_s", "complete"}}


def test_an_audit_end_to_end_then_from_gives_the_same_figures(tiny_model_dir, tmp_path, known_commands, capsys):
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path)) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    printed = capsys.readouterr().out
    audit_dir = tmp_path / "a"
    rows = candidates(audit_dir)
    assert len(rows) == 6 * 4 and [r["greedy"] for r in rows[:4]] == [False, False, False, True]
    for r in rows:
        assert {"item", "fs", "query", "command", "greedy", "usable", "trivial_item", "signals", "success",
                "reward", "beats_nothing"} <= set(r)
        assert set(r["signals"]) == SIGNALS
        assert r["usable"] == isi.is_usable_command(r["command"])
        if not r["usable"]:  # not a command: nothing ran, the execution signals are 0
            assert r["signals"]["ladder"] == 0 and r["signals"]["agreement_itemfs"] == 0
        assert r["success"] == (abs(r["reward"] - 1) < 1e-6)
        assert r["beats_nothing"] == (r["beats_reward"] >= r["nothing_reward"] + au.BEATS_NOTHING_MARGIN - 1e-9)
    assert any(r["success"] for r in rows) and not all(r["success"] for r in rows)
    result = json.loads((audit_dir / "audit.json").read_text())
    assert set(result["signals"]) == SIGNALS
    assert all(FIGURE_KEYS <= set(f) for f in result["signals"].values())
    assert {"random_top1", "greedy_success", "oracle_success", "positives", "settings", "machine",
            "wall_s"} <= set(result)
    assert (audit_dir / "audit.png").stat().st_size > 10_000
    assert all(name in printed for name in SIGNALS)
    first = figures_of(audit_dir)
    (audit_dir / "audit.json").unlink()
    assert isi.main(["audit", "--from", str(audit_dir), "--bootstrap", "50", "--report-to", "tensorboard"]) == 0
    assert figures_of(audit_dir) == first
    # the figures for TensorBoard, read back with its own reader: once, as audit.json has them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert isi.main(["audit", "--from", str(audit_dir), "--bootstrap", "50", "--report-to", "tensorboard"]) == 0
    found = EventAccumulator(str(audit_dir))
    found.Reload()
    for signal, values in first["signals"].items():
        assert [(e.step, round(e.value, 4)) for e in found.Scalars(f"auroc/{signal}")] == [(0, values["auroc"])]
        if values["auroc_beats_nothing_ci"] is not None:
            assert found.Scalars(f"auroc_beats_nothing_low/{signal}")[0].value == pytest.approx(
                values["auroc_beats_nothing_ci"][0], abs=1e-6)
    assert found.Scalars("audit/greedy_success")[0].value == pytest.approx(first["greedy_success"], abs=1e-6)
    # the truth executed again: the same truths (these commands do not depend on the clock)
    truth_keys = ("success", "reward", "beats_reward", "nothing_reward", "beats_nothing", "trivial_item",
                  "gold_broken")
    before = [{k: r[k] for k in truth_keys} for r in candidates(audit_dir)]
    assert isi.main(["audit", "--from", str(audit_dir), "--truth-again", "--bootstrap", "50"]) == 0
    assert [{k: r[k] for k in truth_keys} for r in candidates(audit_dir)] == before
    assert figures_of(audit_dir) == first
    # against itself: every change is 0
    assert isi.main(["audit", "--from", str(audit_dir), "--against", str(audit_dir), "--bootstrap", "20"]) == 0
    changes = json.loads((audit_dir / "audit_changes.json").read_text())
    assert changes["items"] == 6 and all(f["change"] in (0.0, None) for s in changes["signals"].values()
                                         for f in s.values())


def test_an_audit_of_the_domains_held_out_tasks(tiny_model_dir, tmp_path, known_commands, monkeypatch, capsys):
    """audit --eval domain: the items are the domain's held-out tasks (three stand in here, with
    golds the known commands can match), the truth each candidate's run against its task's gold in
    the domain's file system; the setting is kept, so --truth-again runs them there again."""
    golds = [("List this folder", "ls"), ("List this folder, hidden entries too", "ls -a"),
             ("Find every file below this folder", "find . -type f")]
    items = [{"id": f"held-{k:03d}", "group": "domain", "query": query, "tool": None, "gold": gold, "gold2": gold,
              "difficulty": "ls"} for k, (query, gold) in enumerate(golds)]
    monkeypatch.setattr(audit_program, "held_out_items", lambda domain: items)
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path, "--eval", "domain", "--eval-limit", "0")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    audit_dir = tmp_path / "a"
    rows = candidates(audit_dir)
    assert [r["item"] for r in rows[::4]] == [i["id"] for i in items] and {r["fs"] for r in rows} == {"domain"}
    for r in rows:  # its item's gold succeeds; no command or a missing program does not
        if r["command"] == golds[int(r["item"][-3:])][1]:
            assert r["success"], r
        if r["command"] in ("nosuchprogram", "") or not r["usable"]:
            assert not r["success"], r
    assert any(r["success"] for r in rows) and not all(r["success"] for r in rows)
    assert json.loads((audit_dir / "audit_settings.json").read_text())["eval"] == "domain"
    before = [(r["success"], r["reward"]) for r in rows]
    assert isi.main(["audit", "--from", str(audit_dir), "--truth-again", "--bootstrap", "50"]) == 0
    assert [(r["success"], r["reward"]) for r in candidates(audit_dir)] == before
    capsys.readouterr()
    refuse_model_loading(monkeypatch)
    assert isi.main(["audit", "--output", str(tmp_path), "--domain", "pentest", "--eval", "domain"]) == 2
    assert "pentest domain has none" in one_line_error(capsys)


TOOL_COMMANDS = {"nmap -sT -p 22 10.0.0.1": "accepted", "nmap --no-such-option 10.0.0.1": "rejected",
                 "ls -la": "not run", "nmap -p 22 10.0.0.1 | grep open": "not run"}


def test_an_audit_against_the_real_tools(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """audit --eval tools on the pentest domain (no golds): the items are its tasks of the tools
    installed here, the truth whether the real tool accepts the command line, the columns the
    signals that need no file system; --from and --truth-again give the same."""
    needs_tool("nmap")
    monkeypatch.setattr(isi, "extract_command", lambda output: list(TOOL_COMMANDS)[len(output) % len(TOOL_COMMANDS)])
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path, "--domain", "pentest", "--eval", "tools")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    printed = capsys.readouterr().out
    audit_dir = tmp_path / "a"
    rows = candidates(audit_dir)
    settings = json.loads((audit_dir / "audit_settings.json").read_text())
    assert settings["eval"] == "tools" and "nmap" in settings["tools"]
    assert len(rows) == 6 * 4 and {r["fs"] for r in rows} == {"tools"}
    assert all(r["query"] and isi.Task(r["query"]) for r in rows)
    no_file_system = {"inversion_embed", "inversion_lexical", "inversion_mix", "certainty", "coder", "reviewer",
                      "coder_reviewer"}
    for r in rows:
        assert set(r) == {"item", "fs", "query", "command", "output", "greedy", "usable", "signals", "success",
                          "reward", "beats_reward", "nothing_reward", "beats_nothing", "trivial_item", "gold_broken",
                          "tool_run", "tool_verdict", "tool_output", "tool_seconds", "verdict"}
        assert set(r["signals"]) == no_file_system
        assert r["tool_verdict"] == TOOL_COMMANDS[r["command"]], r
        assert r["success"] == (r["tool_verdict"] == "accepted") == r["beats_nothing"] == (r["reward"] == 1.0)
        assert r["nothing_reward"] == 0.0 and not r["trivial_item"]
    assert any(r["success"] for r in rows) and not all(r["success"] for r in rows)
    result = json.loads((audit_dir / "audit.json").read_text())
    assert result["truth"] == "tools" and set(result["signals"]) == no_file_system
    accepted = sum(r["success"] for r in rows if not r["greedy"])
    assert result["positives"]["success_nontrivial"] == accepted and result["nontrivial_items"] == 6
    assert "truth: the domain's real tools accept the command line" in printed
    first = figures_of(audit_dir)
    assert isi.main(["audit", "--from", str(audit_dir), "--bootstrap", "50"]) == 0
    assert figures_of(audit_dir) == first
    before = [(r["success"], r["tool_verdict"]) for r in rows]
    assert isi.main(["audit", "--from", str(audit_dir), "--truth-again", "--bootstrap", "50"]) == 0
    assert [(r["success"], r["tool_verdict"]) for r in candidates(audit_dir)] == before
    capsys.readouterr()
    refuse_model_loading(monkeypatch)
    assert isi.main(["audit", "--output", str(tmp_path / "b"), "--eval", "tools"]) == 2
    assert "bash domain names none" in one_line_error(capsys)
    assert isi.main(["audit", "--output", str(tmp_path / "b"), "--domain", "pentest", "--eval", "tools",
                     "--signal", str(ROOT / "examples" / "short_and_passing.py") + ":short_and_passing"]) == 2
    assert "needs execution, and audit --eval tools runs no command" in one_line_error(capsys)


@pytest.mark.slow
def test_a_stopped_audit_continues_to_the_same_candidates(tiny_model_dir, tmp_path, known_commands, monkeypatch,
                                                         capsys):
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path / "straight")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    chunk, calls = audit_program.audit_chunk, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return chunk(*args, **kwargs)
    monkeypatch.setattr(audit_program, "audit_chunk", stopped_at_the_second)
    assert isi.main(audit_args(tiny_model_dir, tmp_path / "stopped")) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    assert len(candidates(tmp_path / "stopped" / "a")) == 3 * 4  # the first chunk, whole
    monkeypatch.setattr(audit_program, "audit_chunk", chunk)
    assert isi.main(audit_args(tiny_model_dir, tmp_path / "stopped")) == 0
    assert "3 of 6 items done" in capsys.readouterr().out
    assert candidates(tmp_path / "stopped" / "a") == candidates(tmp_path / "straight" / "a")
    # other settings in the same directory are refused
    assert isi.main(audit_args(tiny_model_dir, tmp_path / "stopped", "--temperature", "0.9")) == 2
    assert "holds an audit with other settings" in one_line_error(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--candidates", "0"], "--candidates must be positive"),
    (["--bootstrap", "0"], "--bootstrap must be positive"),
    (["--margin", "2"], "--margin must be in [0, 1]"),
    (["--eval-fs", "9"], "--eval-fs must be file-system numbers"),
    (["--domain", "pentest"], "the pentest domain has none"),
    (["--adapter", "/nonexistent/checkpoint_cycle_1"], "no adapter there"),
    (["--from", "/nonexistent/audit"], "not a readable audit"),
    (["--against", "/nonexistent/audit"], "--against goes with --from AUDIT_DIR"),
    (["--truth-again"], "--truth-again goes with --from AUDIT_DIR"),
])
def test_bad_audit_input_is_one_line_before_anything_loads(extra, message, tmp_path, monkeypatch, capsys):
    refuse_model_loading(monkeypatch)
    assert isi.main(["audit", "--output", str(tmp_path), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_an_audit_without_sandbox_or_shellcheck(tiny_model_dir, tmp_path, known_commands, monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise sb.SandboxUnavailable("bubblewrap cannot run here")
    with monkeypatch.context() as patch:
        refuse_model_loading(patch)
        patch.setattr(audit_program, "Sandbox", unavailable)
        assert isi.main(audit_args(tiny_model_dir, tmp_path)) == 2
        assert "audit executes every candidate in the sandbox: bubblewrap" in one_line_error(capsys)
    monkeypatch.setattr(support.shellcheck, "shellcheck_available", lambda: False)
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path, "--eval-limit", "2", "--chunk-items", "2")) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    assert "shellcheck is not installed" in capsys.readouterr().out
    rows = candidates(tmp_path / "a")
    assert all(r["signals"]["shellcheck_clean"] is None for r in rows)
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["shellcheck"] is False


def test_paired_changes_on_constructed_audits():
    """A signal that ranks the working candidate first before, and last after: its AUROC falls
    from 1 to 0 on every draw; a signal unchanged has change 0 and a zero-width interval."""
    def audit(flip):
        rows = []
        for item in "abcdef":
            for k, works in enumerate([True, False, False]):
                score = (0.9 if works else 0.1 * k) * (-1 if flip else 1)
                rows.append({"item": item, "greedy": False, "usable": True, "trivial_item": False,
                             "signals": {"s": score, "same": float(k)}, "success": works, "reward": 1.0 if works else 0.6,
                             "nothing_reward": 0.6})
        return rows
    changes = au.paired_changes(audit(False), audit(True), bootstrap=100)
    s = changes["signals"]["s"]["auroc_beats_nothing"]
    assert (s["before"], s["after"], s["change"], s["change_ci"]) == (1.0, 0.0, -1.0, [-1.0, -1.0])
    assert changes["signals"]["s"]["top1_beats_nothing"]["change"] == -1.0
    same = changes["signals"]["same"]["auroc"]
    assert same["change"] == 0.0 and same["change_ci"] == [0.0, 0.0]
    assert changes["items"] == 6 and "s" in au.changes_table(changes)
