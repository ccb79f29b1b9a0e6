"""Does any label-free signal lift NL2Bash above the untrained model? The loop experiment of
RESULTS.md section 7, start to finish, resumable.

Embedded model, bash domain, 3 cycles x 16 tasks x 4 candidates, 10 probe tasks, published
settings otherwise; 3 seeds per arm. Arms: --signal inversion (published), execution, and the
audit's two best signals that can select in the loop, ladder and ladder+likelihood; then the one
of those two whose top-1 pick beats doing nothing more often on the audit's items of file
systems 1 and 2 again with --train-from base. Every run is evaluated after its last cycle on all
98 items of file systems 3-5 (nothing is chosen on them); the untrained model once on the same
items (its greedy commands are the same for every seed and arm).

Reported per arm, against the untrained model on the same items: success on the items where
doing nothing does not already succeed, and the share of items where the command's reward (bash's
own complaints taken out) beats the do-nothing command's by the audit's margin; per seed and over
seeds (per item the mean over seeds), with paired bootstrap intervals and McNemar's exact test.

    python bench/loop_experiment.py                  # about 80 min on a 2-core CPU
    python bench/loop_experiment.py --report-only    # the tables from the runs there are

The choice needs the untrained model's audit (RESULTS.md section 6):
    python intrinsic_self_improvement.py audit --candidates 4 --output output/audit

Each run is its own process; a finished run is skipped and a stopped one resumed.
"""
import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import intrinsic_self_improvement as isi  # noqa: E402
import signal_experiment  # noqa: E402  (beside this file)
from support import audit, statistics  # noqa: E402
from support.run_directory import read_jsonl  # noqa: E402

SEEDS = (0, 1, 2)
CYCLES = 3
ARMS = {"inversion": [], "execution": ["--signal", "execution"], "ladder": ["--signal", "ladder"],
        "ladder+likelihood": ["--signal", "ladder+likelihood"]}
CHOICES = ("ladder", "ladder+likelihood")  # the audit's two best; one of them again with --train-from base
SETTINGS = ["--domain", "bash", "--cycles", str(CYCLES), "--tasks", "16", "--candidates", "4",
            "--probe-tasks", "10", "--eval", "nl2bash", "--eval-every", "0", "--eval-fs", "3,4,5"]
DEV = ("1", "2")
AUDIT = ROOT / "output" / "audit" / "smollm2-135m_base_k4_seed0"


def run_one(output: Path, name: str, seed: int, extra: list[str], settings: list[str] = SETTINGS,
            cycles: int = CYCLES) -> float:
    """Run (or finish) one arm and seed; the seconds it took here (0 when already done)."""
    progress = output / name / "progress.json"
    argv = [sys.executable, str(ROOT / "intrinsic_self_improvement.py"), *settings, *extra, "--seed", str(seed),
            "--output", str(output), "--name", name]
    if progress.exists():
        if json.loads(progress.read_text())["last_completed_cycle"] >= cycles:
            return 0.0
        argv.append("--resume")
    started = time.perf_counter()
    with open(output / f"{name}.log", "a") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - started
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def choose(audit_dir: Path) -> tuple[str, dict]:
    """Of CHOICES, the one whose top-1 pick beats doing nothing on more of the audit's items of file
    systems 1 and 2 (sampled candidates; the likelihood here is the audit's coder_reviewer, which
    ranks as the loop's likelihood does: exp of half of it)."""
    rows = [r for r in audit.scored(read_jsonl(audit_dir / "audit_candidates.jsonl"), audit.BEATS_NOTHING_MARGIN)
            if str(r["fs"]) in DEV and not r["greedy"]]
    items = defaultdict(list)
    for r in rows:
        items[r["item"]].append(r)
    figures = {}
    for name in CHOICES:
        def rank(r):
            s = r["signals"]
            second = -1e9 if s["coder_reviewer"] is None else s["coder_reviewer"]
            return (s["ladder"], second if "+" in name else 0.0)
        top1 = []
        for candidates in items.values():
            best = max(rank(r) for r in candidates)
            on_top = [r["beats_nothing"] for r in candidates if rank(r) == best]
            top1.append(sum(on_top) / len(on_top))
        figures[name] = round(sum(top1) / len(top1), 4)
    return max(CHOICES, key=lambda n: figures[n]), {"items": len(items), "top1_beats_nothing": figures}


def untrained(output: Path) -> list[dict]:
    """The untrained model's evaluation records on the experiment's items, made once."""
    return signal_experiment.untrained(output, SETTINGS)


def outcomes(records: list[dict]) -> dict:
    """Per item id: (success, beats_nothing, trivial_item)."""
    return {r["id"]: (bool(r["success"]), audit.beats_nothing(r["beats_reward"], r["nothing_reward"]),
                      bool(r["trivial_item"])) for r in records}


def arm_figures(runs: list[dict], base: dict) -> dict:
    """One arm's seeds against the untrained model: per measure (success on non-trivial items,
    beats_nothing on all), the per-seed values, the mean over seeds with its interval, the paired
    change with its interval, McNemar per seed, and whether every seed beats the untrained model."""
    out = {}
    for measure, k, keep in (("success_nontrivial", 0, lambda o: not o[2]), ("beats_nothing", 1, lambda o: True)):
        items = sorted(i for i in base if keep(base[i]))
        treated = [[run[i][k] for i in items] for run in runs]
        control = [base[i][k] for i in items]
        per_item = [sum(column) / len(runs) for column in zip(*treated)]
        mean, ci = statistics.bootstrap_mean(per_item)
        change, change_ci = statistics.paired_difference(per_item, control)
        seeds = [sum(t) / len(items) for t in treated]
        out[measure] = {"items": len(items), "per_seed": [round(v, 4) for v in seeds], "mean": round(mean, 4),
                        "ci": [round(v, 4) for v in ci], "untrained": round(sum(control) / len(items), 4),
                        "change": round(change, 4), "change_ci": [round(v, 4) for v in change_ci],
                        "mcnemar": [statistics.mcnemar_exact(t, control) for t in treated],
                        "every_seed_above_untrained": all(v > sum(control) / len(items) for v in seeds)}
    return out


def loop_figures(run_dir: Path) -> dict:
    """Pairs trained per cycle, the probe's execution pass rate and signal score, the marks."""
    history = json.loads((run_dir / "progress.json").read_text())["history"]
    cycles = history["cycles"]
    signal = history["config"]["signal"]
    key = isi.own_signal(*isi.resolve_signal(signal)).summary
    return {"pairs": [c["training"]["selected"] for c in cycles],
            "probe_pass": [history["probe_initial"].get("execution_pass_rate")]
            + [c["probe"].get("execution_pass_rate") for c in cycles],
            "probe_signal": [history["probe_initial"].get(key)] + [c["probe"].get(key) for c in cycles],
            "signal_up_execution_down": [c["cycle"] for c in cycles if c.get("signal_up_execution_down")],
            "collapsed": [c["cycle"] for c in cycles if c.get("collapse")],
            "after_health": cycles[-1]["after"]["health"]}


def fmt(f: dict) -> str:
    return (f"{f['mean']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] (seeds {', '.join(f'{v:.3f}' for v in f['per_seed'])}); "
            f"change {f['change']:+.3f} [{f['change_ci'][0]:+.3f}, {f['change_ci'][1]:+.3f}]; McNemar "
            + ", ".join(f"{t['only_treated']}/{t['only_control']} p={t['p']:.2f}" for t in f["mcnemar"])
            + ("; above the untrained model in every seed" if f["every_seed_above_untrained"] else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "output" / "loop"))
    parser.add_argument("--audit", default=str(AUDIT), help="the untrained model's audit directory")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output, audit_dir = Path(args.output), Path(args.audit)
    if not (audit_dir / "audit_candidates.jsonl").is_file():
        parser.error(f"{audit_dir} holds no audit_candidates.jsonl: run the untrained model's audit first (see --help)")
    output.mkdir(parents=True, exist_ok=True)
    chosen, choice = choose(audit_dir)
    print(f"the audit's top-1 pick on file systems 1-2 ({choice['items']} items): {choice['top1_beats_nothing']}; "
          f"--train-from base for {chosen}", flush=True)
    walls, started = {}, time.perf_counter()
    base = outcomes(untrained(output))
    walls["untrained evaluation"] = round(time.perf_counter() - started, 1)
    arms = dict(ARMS) | {f"{chosen}-base": ARMS[chosen] + ["--train-from", "base"]}
    if not args.report_only:
        for seed in SEEDS:
            for arm, extra in arms.items():
                walls[f"{arm}_seed{seed}"] = round(run_one(output, f"{arm}_seed{seed}", seed, extra), 1)
    report = {"settings": SETTINGS, "choice": choice | {"chosen": chosen}, "wall_s_this_invocation": walls,
              "untrained": {m: round(sum(o[k] for o in base.values() if keep(o)) / sum(keep(o) for o in base.values()), 4)
                            for m, k, keep in (("success_nontrivial", 0, lambda o: not o[2]),
                                               ("beats_nothing", 1, lambda o: True))},
              "items": len(base), "trivial_items": sum(o[2] for o in base.values()), "arms": {}}
    print(f"\nuntrained model on file systems 3-5 ({len(base)} items, {report['trivial_items']} where doing nothing "
          f"succeeds): {report['untrained']}")
    for arm in arms:
        dirs = [output / f"{arm}_seed{seed}" for seed in SEEDS]
        finals = [d / f"eval_cycle_{CYCLES}.jsonl" for d in dirs]
        if not all(f.is_file() for f in finals):
            print(f"{arm}: not every seed has finished")
            continue
        figures = arm_figures([outcomes(read_jsonl(f)) for f in finals], base)
        loops = {d.name: loop_figures(d) for d in dirs}
        report["arms"][arm] = figures | {"loops": loops}
        print(f"\n{arm}\n  success, non-trivial ({figures['success_nontrivial']['items']} items): "
              f"{fmt(figures['success_nontrivial'])}\n  beats doing nothing ({figures['beats_nothing']['items']} items): "
              f"{fmt(figures['beats_nothing'])}")
        for name, loop in loops.items():
            print(f"  {name}: pairs per cycle {loop['pairs']}, probe execution pass rate {loop['probe_pass']}, "
                  f"probe signal score {loop['probe_signal']}, signal up while execution down at cycles "
                  f"{loop['signal_up_execution_down']}, collapsed at {loop['collapsed']}")
    (output / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
