"""Seconds of the likelihood signal's two passes (coder: the command given the task; reviewer:
the task given the command, by the frozen base model) over a run's candidates, and their values,
so two versions of the code can be compared on the same candidates.

    python bench/likelihood_speed.py RUN_DIR/examples_cycle_1.jsonl --out output/likelihood_speed.json
    python bench/likelihood_speed.py F.jsonl --out new.json --against old.json   # also the largest value change

The candidates are the `before` stage's usable commands of the file; the model is the embedded
one, untrained, unless --model says otherwise (the run's adapter is not loaded).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
from support.cpu_products import cpu_identity  # noqa: E402
from support.team import Team  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", help="an examples_cycle_N.jsonl")
    parser.add_argument("--out", default="output/likelihood_speed.json")
    parser.add_argument("--against", help="an earlier --out of this script: report the largest change of a value")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("flags", nargs="*", help="the main script's flags (after --)")
    args = parser.parse_args(argv)
    cfg = isi.parse_config(args.flags)
    rows = [json.loads(line) for line in Path(args.examples).read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "before" and r["usable"]]
    lm, _ = isi.load_models(cfg, Team())
    tasks, commands = [isi.Task(r["task"], r["tool"]) for r in rows], [r["command"] for r in rows]
    timings = []
    for _ in range(args.repeats):
        coder, reviewer, coder_s, reviewer_s = isi.coder_reviewer(lm, cfg, tasks, commands, frozen_reviewer=True)
        timings.append({"coder_s": round(coder_s, 2), "reviewer_s": round(reviewer_s, 2)})
        print(f"coder {coder_s:.1f} s, reviewer {reviewer_s:.1f} s for {len(rows)} candidates", flush=True)
    results = {"cpu": cpu_identity(), "date": time.strftime("%Y-%m-%d"), "candidates": len(rows),
               "tasks": len({t.text for t in tasks}), "timings": timings, "coder": coder, "reviewer": reviewer}
    if args.against:
        old = json.loads(Path(args.against).read_text())
        results["largest_change"] = {k: max(abs(a - b) for a, b in zip(results[k], old[k])) for k in ("coder", "reviewer")}
        print(f"largest change against {args.against}: {results['largest_change']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
