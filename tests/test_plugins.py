"""A signal of one's own, written in a file (`--signal path/to/file.py:NAME`, `audit --signal`):
its selection on constructed candidates (the kept set known), its values recorded on every
candidate of a loop run, its audit figure against scikit-learn's, and every bad plug-in refused in
one line (before any model loads where that can be known; naming the signal and the cycle where
only running it can tell, with the completed cycles kept)."""
import json
import math
import random

import pytest

from conftest import one_line_error, read_progress, refuse_model_loading, sandbox_unavailable, tiny_args

import intrinsic_self_improvement as isi
from support import sandbox as sb

SHORTEST = '''
def shortest(candidates):
    """Shorter commands first; no command, no value."""
    return [None if not c["command"] else -len(c["command"]) for c in candidates]
'''


def plugin(tmp_path, source: str, name: str = "shortest") -> str:
    path = tmp_path / "mine.py"
    path.write_text(source)
    return f"{path}:{name}"


def records_with(values: list, copies: int) -> list[dict]:
    return [{"task": f"t{k // copies}", "tool": None, "command": f"c{k}", "usable": True, "ladder": 0.0}
            | ({} if v is None else {"v": v}) for k, v in enumerate(values)]


@pytest.mark.parametrize("rule, values, kept", [
    ("rank", [1.0, 3.0, 2.0, None, None, -1.0], [1, 5]),  # per task the best; a task of Nones keeps nothing
    ("threshold", [0.2, 0.6, 0.5, 0.9, None, 0.1], [1, 2, 3]),
    ("passes", [1, 0, 1, None, 0, 0], [0, 2]),
    ("rank_at_threshold", [0.2, 0.4, 0.3, 0.9, 0.1, 0.6], [3]),
])
def test_a_plugins_selection_by_its_rule(tmp_path, rule, values, kept):
    source = f"def v(candidates):\n    return [c.get('given') for c in candidates]\nv.rule = {rule!r}\n"
    signal = isi.resolve_signal(plugin(tmp_path, source, "v"))
    assert signal[1] is None and signal[0].rule == rule
    records = [r | {"given": r.get("v")} for r in records_with(values, 3)]
    records = isi.plugin_values(signal[0], records, "in a test")
    assert [r["v"] for r in records] == values  # recorded under its name
    assert isi.select_for_training(records, "threshold", signal, random.Random(0), copies=3, threshold=0.5,
                                   floor=isi.ladder_floor(True)) == kept


def test_ladder_then_a_plugin_ranks_the_top_rung(tmp_path):
    """ladder+FILE:NAME: of each task's candidates on its top ladder rung (at least 'exits 0'),
    the one the plug-in ranks first."""
    signal = isi.resolve_signal("ladder+" + plugin(tmp_path, SHORTEST))
    assert signal[0].name == "ladder" and signal[1].name == "shortest"
    records = [{"task": "a", "command": c, "usable": True, "ladder": v} for c, v in
               (("ls -la /x", 1.0), ("ls", 5 / 6), ("ls /x", 1.0),  # two on top: the shorter is kept
                ("true", 0.5), ("x", 0.5), ("yy", 0.2))]  # below the floor: nothing
    records = isi.plugin_values(signal[1], records, "in a test")
    assert isi.kept_by_signal(records, *signal, 3, 0.5, isi.ladder_floor(True)) == [2]
    assert isi.own_signal(*signal).name == "shortest"


@pytest.mark.parametrize("source, name, message", [
    (None, "shortest", "no such file"),
    (SHORTEST, "longest", "defines no longest"),
    ("longest = 3\n", "longest", "longest in .* is not callable"),
    (SHORTEST + "shortest.rule = 'best'\n", "shortest", "shortest.rule 'best' is none of"),
    (SHORTEST + "shortest.needs = {'gold'}\n", "shortest", "shortest.needs must be a set of"),
    ("raise RuntimeError('broken import')\n", "x", "raised RuntimeError: broken import"),
    ("def score(candidates):\n    return []\n", "score", "score is the name of a built-in signal or field"),
])
def test_bad_plugins_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, source, name, message):
    import re
    if source is not None:
        (tmp_path / "mine.py").write_text(source)
    refuse_model_loading(monkeypatch)
    spec = f"{tmp_path / 'mine.py'}:{name}"
    isi.resolve_signal.cache_clear()
    assert isi.main(tiny_args(tmp_path, tmp_path / "out", "--signal", spec)) == 2
    assert re.search(message, one_line_error(capsys))
    isi.resolve_signal.cache_clear()
    assert isi.main(["audit", "--signal", spec, "--output", str(tmp_path / "audits")]) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "out").exists() and not (tmp_path / "audits").exists()


def test_a_plugins_values_are_recorded_and_select_in_the_loop(tiny_model_dir, tmp_path):
    spec = plugin(tmp_path, SHORTEST)
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "mine", "--signal", spec)) == 0
    run_dir = tmp_path / "mine"
    for cycle in (1, 2):
        rows = [json.loads(line) for line in (run_dir / f"examples_cycle_{cycle}.jsonl").read_text().splitlines()]
        assert all("shortest" in r for r in rows)
        assert all(r["shortest"] == (-len(r["command"]) if r["usable"] and r["command"] else None) for r in rows)
        before = [r for r in rows if r["stage"] == "before"]
        kept = isi.kept_by_signal(before, *isi.resolve_signal(spec), 2, 0.0, isi.ladder_floor(True))
        assert [i for i, r in enumerate(before) if r["selected"]] == kept
    history = read_progress(run_dir)["history"]
    probe = history["cycles"][-1]["probe"]
    probed = [r["shortest"] for r in rows if r["stage"] == "probe"]
    scored = [v for v in probed if v is not None]
    assert probe["mean_shortest"] == (round(sum(scored) / len(scored), 4) if scored else None)


FAILING_LATER = '''
calls = []


def flaky(candidates):
    calls.append(1)
    if len(calls) == 5:  # cycle 2's fresh batch: cycle 1 is complete by then
        return {result}
    return [0.5] * len(candidates)
'''


@pytest.mark.parametrize("result, message", [
    ("[float('nan')] * len(candidates)", "returned nan"),
    ("['high'] * len(candidates)", "returned 'high'"),
    ("[0.5]", "returned 1 values for"),
    ("1 / 0", "raised ZeroDivisionError"),
])
def test_a_plugin_failing_at_run_time_is_one_line_and_keeps_the_completed_cycles(tiny_model_dir, tmp_path, capsys,
                                                                               result, message):
    spec = plugin(tmp_path, FAILING_LATER.format(result=result), "flaky")
    isi.resolve_signal.cache_clear()  # a fresh module: its call count from zero
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "3", "--name", "r", "--signal", spec)) == 2
    line = one_line_error(capsys)
    assert f"signal flaky in cycle 2: {message}" in line, line
    assert read_progress(tmp_path / "r")["last_completed_cycle"] == 1
    assert (tmp_path / "r" / "examples_cycle_1.jsonl").exists()
    isi.resolve_signal.cache_clear()


def test_an_audit_of_a_plugin_agrees_with_scikit_learn(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sklearn.metrics import roc_auc_score
    from test_audit import KNOWN, audit_args
    monkeypatch.setattr(isi, "extract_command", lambda output: KNOWN[len(output) % len(KNOWN)])
    spec = plugin(tmp_path, SHORTEST)
    try:
        assert isi.main(audit_args(tiny_model_dir, tmp_path, "--signal", spec)) == 0
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    assert "shortest" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "a" / "audit_candidates.jsonl").read_text().splitlines()]
    assert all(r["signals"]["shortest"] == (-len(r["command"]) if r["usable"] else None) for r in rows)
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    figures = result["signals"]["shortest"]
    assert figures["rule"] == "rank" and result["settings"]["signals"]["shortest"]["rule"] == "rank"
    sampled = [r for r in rows if not r["greedy"] and not r.get("gold_broken")]
    labels = [r["beats_nothing"] for r in sampled]
    assert 0 < sum(labels) < len(labels)
    scores = [-math.inf if r["signals"]["shortest"] is None else r["signals"]["shortest"] for r in sampled]
    expected = roc_auc_score(labels, [-1e9 if s == -math.inf else s for s in scores])
    assert figures["auroc_beats_nothing"] == pytest.approx(expected, abs=1e-4)
    # the figures again from the files: the plug-in's rule comes from the settings
    assert isi.main(["audit", "--from", str(tmp_path / "a"), "--bootstrap", "50"]) == 0
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["signals"]["shortest"]["rule"] == "rank"


def test_a_malformed_audit_row_is_one_line_naming_the_file_and_the_row(tmp_path, capsys):
    audit_dir = tmp_path / "a"
    audit_dir.mkdir()
    (audit_dir / "audit_settings.json").write_text(json.dumps({"threshold": 0.5, "shellcheck": True, "seed": 0,
                                                              "candidates": 1, "chunk_items": 1}))
    good = {"item": "x", "greedy": False, "usable": True, "signals": {"s": 1.0}, "success": True, "reward": 1.0,
            "trivial_item": False, "beats_nothing": True}
    (audit_dir / "audit_candidates.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({"item": "x", "signals": 3}) + "\n")
    assert isi.main(["audit", "--from", str(audit_dir)]) == 2
    line = one_line_error(capsys)
    assert str(audit_dir / "audit_candidates.jsonl") in line and "row 2" in line, line


def test_the_example_signal_of_the_docs():
    """examples/short_and_passing.py, as docs/signals.md runs it: a passing command above every
    failing one, the shorter first; no command, no value; it asks for the execution result."""
    from conftest import ROOT
    (signal, second) = isi.resolve_signal(f"{ROOT / 'examples' / 'short_and_passing.py'}:short_and_passing")
    assert second is None and signal.needs == {"execution"} and signal.rule == "rank"
    records = [{"task": "t", "command": c, "usable": u, "passed": p} for c, u, p in
               (("ls -la /testbed", True, True), ("ls", True, False), ("Sure", False, False), ("ls /x", True, True))]
    values = [r["short_and_passing"] for r in isi.plugin_values(signal, records, "in a test")]
    assert values == [1 + 1 / 3, 1.0, None, 1.5]
    assert isi.kept_by_signal(isi.plugin_values(signal, records, "in a test"), signal, None, 4, 0.5, 4 / 6) == [3]
