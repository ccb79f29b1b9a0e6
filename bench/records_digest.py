"""Fingerprints of what fixed-seed runs write: one short loop run per built-in signal (and a few
controls), an audit, and one run of the embedded model, each in a process of its own; per file,
the sha256 of its records with the wall-clock timings taken out. Run it before and after a change
that must not change what a user sees, and compare the two outputs:

    python bench/records_digest.py --out /tmp/before.json     # on the old commit
    python bench/records_digest.py --out /tmp/after.json --against /tmp/before.json

The tiny runs use a 2-layer random Llama (the tests' model, built here from the embedded model's
tokenizer) whose commands are replaced by known ones of the bash domain (chosen by the length of
what the model wrote), so execution, agreement and the ladder see commands that pass, fail and do
nothing. The stripped files stay in --keep for a diff. About three minutes on a 2-core CPU.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KNOWN = ["ls /testbed", "ls /testbed/", "true", "find /testbed -name '*.txt'", "nosuchprogram x",
         "Sure, here it is", "grep -Q x /testbed/textfile7.txt", "ls -a /testbed"]
AUDIT_KNOWN = ["ls", "true", "ls -a", "find . -type f", "nosuchprogram", "Sure, here it is"]

TINY = ["--tasks", "3", "--candidates", "3", "--probe-tasks", "2", "--max-command-tokens", "6",
        "--max-inversion-tokens", "6", "--scorer", "lexical", "--threshold", "0", "--batch-size", "2",
        "--cycles", "2", "--domain", "bash"]
LOOP_RUNS = {
    **{f"signal-{s}": ["--signal", s] for s in (
        "inversion", "execution", "agreement", "inversion+execution", "likelihood", "ladder",
        "ladder+likelihood", "ladder+inversion")},
    "score-all-ladder": ["--signal", "ladder", "--score-all"],
    "mix-frozen-judge": ["--scorer", "mix", "--judge", "frozen", "--threshold", "0.3"],
    "random-select": ["--signal", "execution", "--select", "random"],
    "pentest": ["--domain", "pentest"],
}
AUDIT = ["audit", "--eval-limit", "6", "--candidates", "3", "--chunk-items", "3", "--max-command-tokens", "6",
         "--max-inversion-tokens", "6", "--bootstrap", "50"]
EMBEDDED = ["--domain", "bash", "--cycles", "1", "--tasks", "3", "--candidates", "3", "--probe-tasks", "2",
            "--signal", "ladder+likelihood", "--score-all"]

DRIVER = """
import sys, intrinsic_self_improvement as isi
known = {known!r}
if known:
    isi.extract_command = lambda output: known[len(output) % len(known)]
sys.exit(isi.main({argv!r}))
"""

TIMINGS = {"seconds", "timing", "train_s", "train_tokens_per_s", "cost", "seconds_per_candidate", "wall_s",
           "machine", "compute"}


def stripped(value):
    """A record (or anything in a file) without its wall-clock timings and machine."""
    if isinstance(value, dict):
        return {k: stripped(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [stripped(v) for v in value]
    return value


def tiny_model(folder: Path) -> Path:
    """The tests' tiny model (bench_cycle.write_tiny_llama)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import bench_cycle
    return bench_cycle.write_tiny_llama(folder)


def run(argv: list[str], known: list[str], log: Path) -> None:
    code = DRIVER.format(known=known, argv=argv)
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env=os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=900)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}); see {log}")


def digests(folder: Path, keep: Path, prefix: str, scratch: Path) -> dict:
    """sha256 of each record file (jsonl: per line) and of the figures, timings stripped (and the
    scratch folder's name, which holds the tiny model)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".jsonl":
            records = [stripped(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.name in ("progress.json", "audit.json"):
            records = stripped(json.loads(path.read_text()))
            records = records.get("history", records)
        else:
            continue
        # in the order written (the key order is part of the bytes)
        text = json.dumps(records, indent=1).replace(str(scratch), "SCRATCH")
        (keep / f"{prefix}__{path.name}").write_text(text)
        out[f"{prefix}/{path.name}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the fingerprints (JSON)")
    parser.add_argument("--against", default=None, help="fingerprints of an earlier run of this script to compare")
    parser.add_argument("--keep", default=None, help="folder for the stripped files (default: beside --out)")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    args = parser.parse_args()
    keep = Path(args.keep or Path(args.out).with_suffix(""))
    keep.mkdir(parents=True, exist_ok=True)
    wanted = None if args.only is None else set(args.only.split(","))
    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = tiny_model(scratch / "tiny")
        runs = {name: (["--model", str(model), *TINY, *extra], KNOWN) for name, extra in LOOP_RUNS.items()}
        runs["audit"] = ([*AUDIT, "--model", str(model)], AUDIT_KNOWN)
        runs["embedded"] = (EMBEDDED, [])
        for name, (argv, known) in runs.items():
            if wanted is not None and name not in wanted:
                continue
            output = scratch / "runs"
            run([*argv, "--output", str(output), "--name", name], known, keep / f"{name}.log")
            result |= digests(output / name, keep, name, scratch)
            print(f"{name}: {len([k for k in result if k.startswith(name + '/')])} files", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.against:
        before = json.loads(Path(args.against).read_text())
        compared = {k for k in before.keys() | result.keys() if wanted is None or k.split("/")[0] in wanted}
        differ = sorted(k for k in compared if before.get(k) != result.get(k))
        print(f"{len(compared)} files; {len(differ)} differ from {args.against}" +
              "".join(f"\n  {k}" for k in differ))
        if differ:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
