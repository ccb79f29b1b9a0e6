"""The machinery of intrinsic_self_improvement.py, one module each; the algorithm stays in the
script.

    model.py          loading the language model (with its LoRA adapter), tokenizer and embedder
    decoder.py        batched generation with a KV cache
    cpu_products.py   the CPU's matrix products: packed frozen weights, LoRA merged (--cpu-matmul)
    team.py           one run across several processes (torchrun, accelerate launch)
    run_directory.py  atomic writes, checks, the lock, checkpoints, resume
    reports.py        stage lines, progress.png, the results file, `compare`
    tasks.py          task domains (domains/*.json and --tasks-file) and their file systems
    sandbox.py        the bubblewrap sandbox every generated command runs in
    nl2bash.py        the NL2Bash benchmark: items, InterCode's reward, NLC2CMD
    bash_structure.py  a command's utilities and flags (bashlex, with a deadline): NLC2CMD, the ladder
    audit.py          the audit's figures: AUROC, Spearman, top-1, bootstrap intervals; table, plot
    audit_directory.py  the audit's files: what it wrote so far, its figures written and read back
    shellcheck.py     the static analyser, one level of the execution ladder

Heavy libraries (torch, transformers) are imported inside the functions that need them, so the
CLI answers --help and bad input at once.

Here, for every module: UsageError, and cache_root (the project's cache folder).
"""
import os
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing touched."""


def cache_root() -> Path:
    """The project's cache folder, kept across runs: the embedded model as a plain transformers
    folder (model.py), the --cpu-matmul choice measured on this machine (cpu_products.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intrinsic-self-improvement"
