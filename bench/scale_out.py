"""Cycle seconds of one run with 1 and with N processes (torchrun, one device each): the same
command, model, tasks and seed, each run in a directory of its own; prints and writes (--out)
each run's seconds per stage of cycle 1 and the speed-up over one process.

    # several GPUs: Mistral-7B's shape and tokenizer with random weights, 4-bit, the published 50 x 3
    python bench/scale_out.py --random-config mistral-7b --processes 1,4 --out output/scale_out_gpu.json
    # the CPU path of the script (two processes share this machine's cores: no speed-up to expect)
    python bench/scale_out.py --random-config tiny --processes 1,2 --tasks 8 --candidates 2

Random weights seldom stop early, so most sequences run to their caps and the work per task
hardly depends on N (each run's tokens generated are printed).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_cycle  # noqa: E402

STAGES = ("generate_s", "invert_s", "score_s", "execute_s")


def run_once(model: Path, output: Path, processes: int, args) -> dict:
    """One cycle in `processes` processes; the figures of its cycle 1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "--",
               str(ROOT / "intrinsic_self_improvement.py"), "--model", str(model), "--output", str(output),
               "--name", f"processes{processes}", "--cycles", "1", "--tasks", str(args.tasks),
               "--candidates", str(args.candidates), "--probe-tasks", str(args.probe_tasks), "--threshold", "0",
               "--quantize", args.quantize, "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes: exit code {done.returncode}\n{done.stderr[-3000:]}")
    history = json.loads((output / f"processes{processes}" / "progress.json").read_text())["history"]
    cycle = history["cycles"][0]
    after = cycle["timing"]["after"]
    return {"processes": history["compute"]["processes"], "cycle_s": cycle["timing"]["cycle_s"],
            "train_s": cycle["training"].get("train_s", 0.0), "train_steps": cycle["training"]["steps"],
            "probe_s": cycle["probe"].get("seconds", 0.0),
            "after_batch": {k: after[k] for k in STAGES if k in after} | {"generate_tokens": after["generate_tokens"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-config", choices=["tiny", "mistral-7b"], required=True)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts; the first is the baseline")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--probe-tasks", type=int, default=20)
    parser.add_argument("--quantize", default="auto", choices=["auto", "4bit", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600, help="per run")
    parser.add_argument("--out", default="output/scale_out.json")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.processes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        model = bench_cycle.random_model_dir(args.random_config, Path(scratch))
        runs = {n: run_once(model, Path(scratch) / "runs", n, args) for n in counts}
    base = runs[counts[0]]["cycle_s"]
    for n, figures in runs.items():
        figures["speedup"] = round(base / figures["cycle_s"], 2)
        print(f"{n} processes: cycle {figures['cycle_s']:.1f} s (train {figures['train_s']:.1f} s, probe "
              f"{figures['probe_s']:.1f} s, after-batch {json.dumps(figures['after_batch'])}); "
              f"speed-up {figures['speedup']}x", flush=True)
    import torch
    results = {"model": args.random_config, "tasks": args.tasks, "candidates": args.candidates,
               "device_name": bench_cycle.device_name("cuda" if torch.cuda.is_available() else "cpu"),
               "runs": {str(n): f for n, f in runs.items()}}
    bench_cycle.write_figures(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
