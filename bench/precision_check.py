"""Does the compute precision change what the loop measures? The same tasks and seeds through
GENERATE -> INVERT -> SCORE (embedding scorer, untrained model) in fp32 and in bf16: accepted
candidates, mean score, unusable commands and seconds per seed, plus a greedy pass on a fixed
task set. bf16 rounds differently, so single samples differ; what must agree is the figures,
within sampling noise. Writes the figures as JSON.

    python bench/precision_check.py --out output/precision_check.json    # about 5 minutes here
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
import support.model
import support.tasks
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cycle  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=support.model.EMBEDDED_MODEL, help="as in the main script")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--greedy-tasks", type=int, default=50)
    parser.add_argument("--out", default="output/precision_check.json")
    args = parser.parse_args(argv)

    domain = support.tasks.builtin_domain("pentest")
    embedder = support.model.load_embedder(isi.parse_config([]), "cpu")
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = isi.parse_config(["--model", args.model, "--precision", precision, "--device", "cpu"])
        lm = support.model.load_language_model(cfg)
        rows = []
        for seed in range(args.seeds):
            tasks = isi.draw_tasks(domain, args.tasks, random.Random(seed))
            start = time.perf_counter()
            stage = isi.run_stage(lm, embedder, cfg, tasks, copies=args.candidates, greedy=False, seed=seed, label=precision)
            summary = isi.summarize(stage.records, cfg.scorer)
            rows.append({"seed": seed, "accepted": summary["accepted"], "mean_score": summary["mean_score"],
                         "unusable": summary["unusable_commands"], "seconds": round(time.perf_counter() - start, 1)})
            print(precision, rows[-1], flush=True)
        probe = isi.draw_tasks(domain, args.greedy_tasks, random.Random(99), distinct=True)
        greedy = isi.summarize(isi.run_stage(lm, embedder, cfg, probe, copies=1, greedy=True, seed=0,
                                             label=precision).records, cfg.scorer)
        results[precision] = {"dtype": lm.dtype, "sampled": rows,
                              "greedy": {k: greedy[k] for k in ("accepted", "mean_score", "unusable_commands")}}
        print(precision, "greedy", results[precision]["greedy"], flush=True)
    bench_cycle.write_figures(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
