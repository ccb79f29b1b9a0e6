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
    audit.py          the audit's figures: AUROC, Spearman, top-1, bootstrap intervals; table, plot
    audit_directory.py  the audit's files: what it wrote so far, its figures written and read back
    shellcheck.py     the static analyser, one level of the execution ladder

Heavy libraries (torch, transformers) are imported inside the functions that need them, so the
CLI answers --help and bad input at once.
"""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing touched."""
