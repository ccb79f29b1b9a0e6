"""The label-free signal experiment of RESULTS.md section 5, start to finish, resumable.

Embedded model, bash domain, 5 cycles x 8 tasks x 6 candidates (48 commands a batch, and six
chances per task to agree), 10 probe tasks, published settings otherwise; 3 seeds per arm:
--signal inversion (published), execution, agreement; then the arm with the highest NL2Bash
success on file systems 1 and 2 (the only items any choice looks at) again with --train-from
base. Every run evaluates a fixed half of the NL2Bash items (150, every other one: 101 on file
systems 1-2, 49 on 3-5) after its last cycle; the untrained model is evaluated once on the same
items (greedy decoding: its commands are the same for every seed and signal). The figures to
report are those of file systems 3 to 5. Beside them: a command that does nothing (`true`).

    python bench/signal_experiment.py                 # about 70 min on a 2-core CPU
    python bench/signal_experiment.py --report-only   # the tables from the runs there are

Each run is its own process; a finished run is skipped and a stopped one resumed, so the script
can be started again after an interruption.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import intrinsic_self_improvement as isi  # noqa: E402
import support.model
import support.reports
import support.run_directory
from support import nl2bash  # noqa: E402

SEEDS = (0, 1, 2)
ARMS = {"inversion": [], "execution": ["--signal", "execution"], "agreement": ["--signal", "agreement"]}
SETTINGS = ["--domain", "bash", "--cycles", "5", "--tasks", "8", "--candidates", "6", "--probe-tasks", "10",
            "--eval", "nl2bash", "--eval-every", "0", "--eval-limit", "150"]
DEV, TEST = (1, 2), (3, 4, 5)


def run_one(output: Path, name: str, seed: int, extra: list[str]) -> float:
    """Run (or finish) one arm and seed; returns the seconds it took here (0 when already done)."""
    progress = output / name / "progress.json"
    argv = [sys.executable, str(ROOT / "intrinsic_self_improvement.py"), *SETTINGS, *extra, "--seed", str(seed),
            "--output", str(output), "--name", name]
    if progress.exists():
        if json.loads(progress.read_text())["last_completed_cycle"] >= 5:
            return 0.0
        argv.append("--resume")
    started = time.perf_counter()
    with open(output / f"{name}.log", "a") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - started
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def final_eval(output: Path, name: str, groups) -> dict:
    history = support.reports.load_run(str(output / name))["history"]
    return support.reports.eval_figures(str(output / name), history, len(history["cycles"]), groups)


def best_arm(output: Path) -> str:
    """The arm with the highest mean success on file systems 1-2 after training (reward breaks ties)."""
    def key(arm):
        finals = [final_eval(output, f"{arm}_seed{seed}", DEV) for seed in SEEDS]
        return (sum(f["success_rate"] for f in finals) / len(finals), sum(f["mean_reward"] for f in finals) / len(finals))
    return max(ARMS, key=key)


def untrained(output: Path, settings: list[str] = SETTINGS) -> list[dict]:
    """The untrained model's evaluation records (as a run's eval_cycle_0.jsonl) under the runs'
    settings, made once."""
    path = output / "untrained_eval.jsonl"
    if not path.exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = isi.parse_config(settings)
        lm = support.model.load_language_model(cfg)
        summary, records = isi.external_evaluation(lm, support.model.load_embedder(cfg, lm.device), cfg,
                                                   isi.evaluation_items(cfg), 0, isi.Benchmark("eval", "eval"))
        support.run_directory.write_jsonl(path, records)
    return support.run_directory.read_jsonl(path)


def do_nothing() -> list[dict]:
    """`true` for every evaluated item, scored like a model's command."""
    items = isi.evaluation_items(isi.parse_config(SETTINGS))
    with nl2bash.Evaluator(items) as evaluator:
        return evaluator.score(["true"] * len(items))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "output" / "signals"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    walls = {}
    started = time.perf_counter()
    reference = untrained(output)
    walls["untrained evaluation"] = round(time.perf_counter() - started, 1)
    if not args.report_only:
        for seed in SEEDS:
            for arm, extra in ARMS.items():
                walls[f"{arm}_seed{seed}"] = run_one(output, f"{arm}_seed{seed}", seed, extra)
    chosen = best_arm(output)
    print(f"best arm on file systems 1-2: {chosen}", flush=True)
    if not args.report_only:
        for seed in SEEDS:
            name = f"{chosen}-base_seed{seed}"
            walls[name] = run_one(output, name, seed, ARMS[chosen] + ["--train-from", "base"])
    runs = sorted(str(p.parent) for p in output.glob("*/progress.json"))
    nothing = do_nothing()
    report = {"best_arm_on_fs_1_2": chosen, "wall_s_this_invocation": walls,
              "untrained": {"fs_1_2": support.reports.figures_over(reference, DEV), "fs_3_4_5": support.reports.figures_over(reference, TEST)},
              "do_nothing": {"fs_1_2": support.reports.figures_over(nothing, DEV), "fs_3_4_5": support.reports.figures_over(nothing, TEST)}}
    for label, groups in (("file systems 1-2 (settings chosen here)", DEV), ("file systems 3-5 (reported)", TEST)):
        print(f"\n## {label}\n")
        print(support.reports.compare_runs(runs, output / f"comparison_fs{''.join(map(str, groups))}.png", groups))
    for name in ("untrained", "do_nothing"):
        print(f"\n{name}:", json.dumps(report[name]))
    (output / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
