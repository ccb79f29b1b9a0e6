"""How much of the achievable lift does a label-free signal recover? The testbed experiment of
RESULTS.md section 9, start to finish, resumable.

Embedded model, bash domain, 2 cycles x 150 tasks x 4 candidates at temperature 0.3, no probe,
published settings otherwise (threshold 0.5, lr 2e-4, batch 4, training on each cycle's
selection); 3 seeds per arm. Arms: --select oracle (trains on the candidates whose run matches
their task's gold: uses labels, the ceiling), --select oracle-sized (as many as inversion keeps,
those whose runs come closest to their gold's: uses labels, the ceiling at inversion's count),
inversion (published), ladder, ladder+likelihood, and random (--select random: a random subset of
the size inversion keeps). Every run is evaluated after
its last cycle on the domain's 150 held-out tasks (never drawn for training) and, as transfer, on
NL2Bash's file systems 3-5; the untrained model once on the same items (its greedy commands are the
same for every seed and arm).

Reported per arm, against the untrained model on the same items: held-out success (per item the
mean over seeds, with a bootstrap interval), the paired change with its interval, McNemar per seed,
the share of the oracle's lift recovered, and the pairs trained per cycle; on NL2Bash, success on
the items where doing nothing fails, and beats_nothing.

    python bench/testbed_experiment.py                  # about 2 h 15 min on a 2-core CPU
    python bench/testbed_experiment.py --report-only    # the tables from the runs there are

Each run is its own process; a finished run is skipped and a stopped one resumed.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import intrinsic_self_improvement as isi  # noqa: E402
import loop_experiment  # noqa: E402  (beside this file)
import support.model  # noqa: E402
from support import statistics  # noqa: E402
from support.run_directory import read_jsonl, write_jsonl  # noqa: E402
from support.tasks import load_domain  # noqa: E402

SEEDS = (0, 1, 2)
CYCLES = 2
SETTINGS = ["--domain", "bash", "--cycles", str(CYCLES), "--tasks", "150", "--candidates", "4",
            "--temperature", "0.3", "--probe-tasks", "0", "--eval", "nl2bash,domain", "--eval-every", "0",
            "--eval-fs", "3,4,5"]
ARMS = {"oracle": ["--select", "oracle"], "oracle-sized": ["--select", "oracle-sized"], "inversion": [],
        "ladder": ["--signal", "ladder"], "ladder+likelihood": ["--signal", "ladder+likelihood"],
        "random": ["--select", "random"]}


def untrained(output: Path) -> dict[str, list[dict]]:
    """The untrained model's records on both benchmarks (as a run's <key>_cycle_0.jsonl), made once."""
    paths = {key: output / f"untrained_{key}.jsonl" for key in ("eval", "eval_domain")}
    if not all(p.exists() for p in paths.values()):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = isi.parse_config(SETTINGS)
        lm = support.model.load_language_model(cfg)
        embedder = support.model.load_embedder(cfg, lm.device)
        for benchmark, items in isi.benchmarks(cfg, load_domain(cfg.tasks_file, cfg.domain)):
            _, records = isi.external_evaluation(lm, embedder, cfg, items, 0, benchmark)
            write_jsonl(paths[benchmark.key], records)
    return {key: read_jsonl(path) for key, path in paths.items()}


def shares(arms: dict, base: dict, ceiling: str) -> dict:
    """Each other arm's share of the `ceiling` arm's lift in held-out success (per item the mean
    over seeds)."""
    items = sorted(base)
    means = {arm: [sum(run[i][0] for run in runs) / len(runs) for i in items] for arm, runs in arms.items()}
    control = [float(base[i][0]) for i in items]
    return {arm: statistics.share_of_lift(means[arm], means[ceiling], control)
            for arm in arms if not arm.startswith("oracle") and ceiling in arms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "output" / "testbed_arms"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated (default: 0,1,2)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    walls, started = {}, time.perf_counter()
    base_records = untrained(output)
    walls["untrained evaluation"] = round(time.perf_counter() - started, 1)
    if not args.report_only:
        for seed in seeds:
            for arm, extra in ARMS.items():
                walls[f"{arm}_seed{seed}"] = round(loop_experiment.run_one(output, f"{arm}_seed{seed}", seed, extra,
                                                                                SETTINGS, CYCLES), 1)
    base = {key: loop_experiment.outcomes(records) for key, records in base_records.items()}
    report = {"settings": SETTINGS, "seeds": seeds, "wall_s_this_invocation": walls, "arms": {},
              "untrained": {"domain_success": round(sum(o[0] for o in base["eval_domain"].values())
                                                    / len(base["eval_domain"]), 4)}}
    finished = {}
    for arm in ARMS:
        dirs = [output / f"{arm}_seed{seed}" for seed in seeds]
        finals = {key: [d / f"{key}_cycle_{CYCLES}.jsonl" for d in dirs] for key in ("eval", "eval_domain")}
        if not all(f.is_file() for files in finals.values() for f in files):
            print(f"{arm}: not every seed has finished")
            continue
        runs = {key: [loop_experiment.outcomes(read_jsonl(f)) for f in files] for key, files in finals.items()}
        finished[arm] = runs["eval_domain"]
        domain = loop_experiment.arm_figures(runs["eval_domain"], base["eval_domain"])["success_nontrivial"]
        transfer = loop_experiment.arm_figures(runs["eval"], base["eval"])
        pairs = {d.name: [c["training"]["selected"] for c in json.loads((d / "progress.json").read_text())
                          ["history"]["cycles"]] for d in dirs}
        # the smallest change this design detects (80% power, two-sided 5%): 2.8 standard errors,
        # the standard error read off the paired interval (3.92 of them wide)
        domain["detectable_change"] = round(2.8 * (domain["change_ci"][1] - domain["change_ci"][0]) / 3.92, 4)
        report["arms"][arm] = {"domain_success": domain, "nl2bash": transfer, "pairs": pairs}
        print(f"\n{arm}\n  held-out success ({domain['items']} tasks): {loop_experiment.fmt(domain)}"
              f"\n  NL2Bash 3-5, success where doing nothing fails ({transfer['success_nontrivial']['items']} items): "
              f"{loop_experiment.fmt(transfer['success_nontrivial'])}"
              f"\n  NL2Bash 3-5, beats doing nothing ({transfer['beats_nothing']['items']} items): "
              f"{loop_experiment.fmt(transfer['beats_nothing'])}\n  pairs per cycle: {pairs}; smallest detectable change "
              f"in held-out success about {domain['detectable_change']:.3f}")
    for ceiling in ("oracle", "oracle-sized"):
        report[f"share_of_{ceiling}_lift"] = shares(finished, base["eval_domain"], ceiling)
        for arm, share in report[f"share_of_{ceiling}_lift"].items():
            interval = ("" if share["share_ci"] is None
                        else f" [{share['share_ci'][0]:+.2f}, {share['share_ci'][1]:+.2f}]")
            print(f"{arm}: lift {share['arm_lift']:+.4f} of {ceiling}'s {share['oracle_lift']:+.4f}; share "
                  + (f"none ({ceiling} does not lift)" if share["share"] is None else f"{share['share']:+.2f}{interval}"))
    (output / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
