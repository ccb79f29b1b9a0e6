"""The run directory: atomic writes, checks before anything loads, the lock, checkpoints and
resume.

Every file is written under a temporary name and renamed into place (a reader sees the old
version or the new one, whole); progress.json is written last in a cycle, so it alone says
what is complete. docs/run-directory.md describes the files, docs/faults.md the recovery.

The rest may call: write_text, write_bytes, write_json, write_jsonl, read_jsonl, commit, partial_path,
check_run_directory, hold_run_directory, prepare_run_directory, save_checkpoint,
load_checkpoint, resumed_history, read_progress, leftovers.
"""
import errno
import json
import os
import re
import shutil
from pathlib import Path

from support import UsageError


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk: a power cut cannot then undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """Where a file or folder is written before it is renamed into place. A stopped run leaves at
    most these behind, and a resume removes them (see leftovers)."""
    return path.with_name(path.name + ".tmp")


def commit(partial: Path, path: Path) -> None:
    """Atomic and durable: a reader sees the old version or the new one, whole, even after a kill
    or a power cut; never half of one."""
    for written in [partial, *partial.rglob("*")] if partial.is_dir() else [partial]:
        fsync_path(written)
    os.replace(partial, path)
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    partial = partial_path(path)
    partial.write_text(text)
    commit(partial, path)


def write_bytes(path: Path, data: bytes) -> None:
    partial = partial_path(path)
    partial.write_bytes(data)
    commit(partial, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CYCLE_FILE = re.compile(r"(checkpoint|examples|eval|probe)_cycle_(\d+)(\.jsonl)?")


def leftovers(run_dir: Path, last_completed: int) -> list[Path]:
    """What a run stopped mid-cycle may have left: partial writes, and the files of cycles after
    the last completed one (-1: none completed, cycle 0's probe included). progress.json is
    written last in a cycle, so it alone says what is complete."""
    if not run_dir.is_dir():
        return []
    return sorted(path for path in run_dir.iterdir() if path.name.endswith(".tmp") or (
        (match := CYCLE_FILE.fullmatch(path.name)) and int(match.group(2)) > last_completed))


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def read_progress(path: Path, what: str = "", then: str = "; the run cannot go on from it: restore the file, "
                  "or start again with another --name") -> dict:
    """progress.json, checked for what a resume (or compare) needs; damaged, a UsageError that
    starts with `what` and ends with `then`."""
    try:
        progress = json.loads(path.read_text())
        history = progress["history"]
        if not isinstance(history["config"], dict):
            raise ValueError("history.config is not an object")
        if [c["cycle"] for c in history["cycles"]] != list(range(1, progress["last_completed_cycle"] + 1)):
            raise ValueError(f"history.cycles does not run from 1 to {progress['last_completed_cycle']}")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSON and Unicode errors are ValueErrors
        raise UsageError(f"{what}{path} is damaged ({type(err).__name__}: {err}){then}") from None
    return progress


def check_safetensors(path: Path) -> None:
    """The header is whole and the file as long as it says: catches empty and truncated files."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("empty or truncated")
        header_bytes = int.from_bytes(head, "little")
        header = json.loads(file.read(header_bytes))
    data_bytes = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + header_bytes + data_bytes:
        raise ValueError(f"{path.stat().st_size} bytes, the header describes {8 + header_bytes + data_bytes}")


CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "pending_batch.jsonl", "pending_timing.json",
                    "training_pool.jsonl")


def check_checkpoint(run_dir: Path, cycle: int) -> None:
    """Before any model loads: every file a resume after `cycle` reads is there and readable."""
    checkpoint = run_dir / f"checkpoint_cycle_{cycle}"
    what_to_do = (f"the run cannot go on after cycle {cycle} without it: restore it, or start again with "
                  f"another --name")
    if not checkpoint.is_dir():
        raise UsageError(f"--resume: {checkpoint} is missing; {what_to_do}")
    for name in CHECKPOINT_FILES:
        path = checkpoint / name
        try:
            if name.endswith(".safetensors"):
                check_safetensors(path)
            elif name.endswith(".jsonl"):
                read_jsonl(path)
            else:
                json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problem = "missing" if not path.exists() else f"damaged ({type(err).__name__}: {err})"
            raise UsageError(f"--resume: {path} is {problem}; {what_to_do}") from None


def check_run_directory(run_dir: Path, cfg, settings: dict, defaults: dict) -> dict | None:
    """Before any model loads: refuse to overwrite a run, refuse to resume a different experiment
    (`settings`, the run's experiment settings; `defaults`, their values for settings added after
    a run was made) or from damaged files. Returns the saved progress when resuming, else None.

    A run stopped before its first cycle completed holds nothing to keep: the same command, or
    --resume, starts it over."""
    progress_file = run_dir / "progress.json"
    if not progress_file.exists():
        if cfg.resume and not leftovers(run_dir, -1):
            raise UsageError(f"--resume: no run to resume in {run_dir} (no progress.json)")
        return None
    if not cfg.resume:
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume or choose another --name")
    progress = read_progress(progress_file)
    saved = progress["history"]["config"]
    for key, value in settings.items():
        if saved.get(key, defaults[key]) != value:
            raise UsageError(f"--resume: this run was made with {key}={saved.get(key, defaults[key])!r}, not {value!r}; "
                             f"resuming with a different {key} would change the experiment")
    if progress["last_completed_cycle"] < cfg.cycles:
        check_checkpoint(run_dir, progress["last_completed_cycle"])
    return progress


def cannot_write(run_dir: Path, err: OSError) -> UsageError:
    return UsageError(f"--output: cannot write the run directory {run_dir} ({err.strerror or err})")


def hold_run_directory(run_dir: Path):
    """Take the run directory for this process (creating it), or refuse in one line when another
    process holds it: two starts of the same run would write the same files. The lock is the
    kernel's (flock on run_dir/.lock), so it goes with the process however that ends; the file
    names the holder's pid. Returns the open lock file: the lock lasts while it is open."""
    import fcntl
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as err:
        raise cannot_write(run_dir, err) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(f"{run_dir} is in use by another process (pid {holder}): one run directory takes "
                         f"one run at a time; wait for it to stop, or choose another --name") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def prepare_run_directory(run_dir: Path, last_completed: int) -> None:
    """Create the folder (and show it can be written) before any model loads, and remove what a
    stopped cycle left, so nothing half-written is ever read."""
    stale = leftovers(run_dir, last_completed)
    if stale and last_completed < 0:
        print(f"note: {run_dir} holds a run stopped before its first cycle completed; starting it over", flush=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove(stale)
        write_text(run_dir / ".writable", "")
        (run_dir / ".writable").unlink()
    except OSError as err:
        raise cannot_write(run_dir, err) from None


def resumed_history(saved: dict, compute: dict, processes: int) -> dict:
    """A saved run's history, filled in where runs made by older versions lack a record, with a
    note where this invocation computes differently (`compute`, in `processes` processes)."""
    history = saved["history"]
    before = history.setdefault("compute", {})
    before.setdefault("matmul", "plain")  # runs made before --cpu-matmul ran PyTorch's own products
    if any(before.get(key, compute[key]) != compute[key] for key in compute):
        print(f"note: cycles so far ran on {before['device']} in {before['dtype']} (weights "
              f"{before.get('weights', before['dtype'])}, products {before['matmul']}); these run "
              f"on {compute['device']} in {compute['dtype']} (weights {compute['weights']}, products "
              f"{compute['matmul']})", flush=True)
    # runs made before processes were counted ran in one
    counted = before.setdefault("processes", [1] * (saved["last_completed_cycle"] + 1))
    if counted[-1] != processes:
        print(f"note: cycles so far ran in {counted[-1]} process(es), these in {processes}: the sampled "
              f"figures depend on the number of processes", flush=True)
    return history


def save_checkpoint(lm, run_dir: Path, cycle: int, pending, pool: list[dict]) -> None:
    """Adapter (loadable with peft), the already-generated batch the next cycle trains on, and the
    training pool (--data cumulative); written under a temporary name and renamed once complete."""
    final = run_dir / f"checkpoint_cycle_{cycle}"
    partial = partial_path(final)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        lm.model.save_pretrained(partial, save_embedding_layers=False)  # "auto" asks the hub for the base config
    except Exception as err:  # safetensors reports a full disk as its own error type
        if "No space left" in str(err) or "StorageFull" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial)) from err
        raise
    write_jsonl(partial / "pending_batch.jsonl", pending.records)
    write_json(partial / "pending_timing.json", pending.timing)
    write_jsonl(partial / "training_pool.jsonl", pool)
    commit(partial, final)


def load_adapter(lm, checkpoint: Path) -> None:
    """A checkpoint's LoRA adapter into `lm` (the same shape)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(lm.model, load_file(checkpoint / "adapter_model.safetensors", device=lm.device))


def load_checkpoint(lm, run_dir: Path, cycle: int) -> tuple[list[dict], dict, list[dict]]:
    """The adapter into `lm`; returns the pending batch's records and timing, and the pool."""
    checkpoint = run_dir / f"checkpoint_cycle_{cycle}"
    load_adapter(lm, checkpoint)
    return (read_jsonl(checkpoint / "pending_batch.jsonl"),
            json.loads((checkpoint / "pending_timing.json").read_text()),
            read_jsonl(checkpoint / "training_pool.jsonl"))
