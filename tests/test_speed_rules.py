"""Speed must not change results: bf16 against fp32, and scoring that does not depend on how
inputs are batched. Also the benchmark's CPU path, on a tiny config. (The batched decoder against
a plain one-by-one reference is in test_decoder.py.)"""
import json
import random
import sys

import pytest
import torch

from conftest import ROOT

import intrinsic_self_improvement as isi
import support.model
import support.tasks

sys.path.insert(0, str(ROOT / "bench"))
import bench_cycle  # noqa: E402


@pytest.mark.slow
def test_bf16_scores_like_fp32_within_sampling_noise():
    """bf16 (the default on CPUs with AMX, and on GPUs) changes the rounding, so single samples
    differ; over 30 tasks x 3 candidates its mean score and acceptance must stay within four
    standard errors of float32's on the same tasks and seed."""
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 30, random.Random(7))
    embedder = support.model.load_embedder(isi.parse_config([]), "cpu")
    scores = {}
    for precision in ("fp32", "bf16"):
        cfg = isi.parse_config(["--precision", precision])
        lm = support.model.load_language_model(cfg)
        assert lm.dtype == {"fp32": "float32", "bf16": "bfloat16"}[precision]
        stage = isi.run_stage(lm, embedder, cfg, tasks, copies=3, greedy=False, seed=0, label=precision)
        scores[precision] = torch.tensor([r["score"] for r in stage.records])
    a, b = scores["fp32"], scores["bf16"]
    n = len(a)
    assert abs(a.mean() - b.mean()) <= 4 * ((a.var() + b.var()) / n).sqrt(), (a.mean(), b.mean())
    accepted_a, accepted_b = (a >= 0.5).sum().item(), (b >= 0.5).sum().item()
    p = (accepted_a + accepted_b) / (2 * n)
    assert abs(accepted_a - accepted_b) <= 4 * (2 * n * p * (1 - p)) ** 0.5 + 1, (accepted_a, accepted_b)


def test_embedding_scores_do_not_depend_on_the_batch():
    embedder = support.model.load_embedder(isi.parse_config([]), "cpu")
    originals = ["Scan ports 22,80 on 10.0.0.1", "Find hidden directories on http://10.0.0.1",
                 "Search for public exploits for vsftpd 2.3.4 and show where they are stored on disk"]
    recons = ["Scan two ports on a host", "Brute-force web paths", "List exploits for an FTP server"]
    together = isi.embedding_scores(embedder, originals, recons)
    alone = [isi.embedding_scores(embedder, [o], [r])[0] for o, r in zip(originals, recons)]
    reversed_batch = isi.embedding_scores(embedder, originals[::-1], recons[::-1])[::-1]
    assert max(abs(a - b) for a, b in zip(together, alone)) < 1e-5
    assert max(abs(a - b) for a, b in zip(together, reversed_batch)) < 1e-5


def test_lexical_scores_are_exact_functions_of_their_inputs():
    pairs = [("Scan ports 22,80 on 10.0.0.1", "scan ports on 10.0.0.1"), ("List files", "")]
    assert [isi.lexical_score(*p) for p in pairs] == [isi.lexical_score(*p) for p in pairs]


@pytest.mark.slow
def test_bench_cycle_cpu_path_on_a_tiny_config(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_cycle.main(["--random-config", "tiny", "--tasks", "2", "--candidates", "2", "--threshold", "0",
                             "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    for path in ("project", "published"):
        stages = figures[path]
        assert stages["candidates"] == 4 and stages["accepted"] == 4
        assert stages["train_pairs"] == figures["project"]["train_pairs"] and stages["train_steps"] >= 1
        assert stages["generate_s"] > 0 and stages["peak_memory_gib"] > 0
    # random weights never stop early: the published pattern generates to its 100-token cap
    assert figures["published"]["generate_tokens"] == 4 * bench_cycle.PUBLISHED_TOKENS["command"]
    assert figures["speedup"]["total"] > 0
    assert torch.__version__ == figures["versions"]["torch"]
    # the arithmetic of each stage against the machine's own matmul rate
    project = figures["project"]
    assert project["generate_prefilled"] > 0 and project["invert_prefilled"] > 0 and project["train_positions"] > 0
    assert set(figures["machine_gflops"]) >= {"rows_4", "rows_8", "rows_1"}
    assert all(rate > 0 for rate in figures["machine_gflops"].values())
    assert all(0 < figures["machine_gflops_median"][k] <= best for k, best in figures["machine_gflops"].items())
    for stage in ("generate", "invert", "score", "train"):
        assert figures["arithmetic"][stage]["gflop"] >= 0 and figures["arithmetic"][stage]["gflops"] >= 0
    shape = {"layer_params": 10, "head_params": 100, "hidden": 1, "intermediate": 1}
    known = {"generate_prefilled": 5, "generate_tokens": 2, "invert_prefilled": 0, "invert_tokens": 0,
             "score_prefilled": 0, "score_tokens": 0, "train_positions": 3, "train_command_tokens": 1}
    arithmetic = bench_cycle.stage_arithmetic(known, shape)
    assert arithmetic["generate"] * 1e9 == 2 * 10 * 7 + 2 * 100 * 2
    assert arithmetic["train"] * 1e9 == 4 * 10 * 3 + 4 * 100 * 1
