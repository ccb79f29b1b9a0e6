"""The CLI as one process of a team (run it under torchrun or accelerate launch), with every
file it commits logged to $COMMIT_LOG.<rank>, so a test can check who wrote what and how
often. FAIL_RANK=r makes process r fail at its first training step (a crash, not bad input)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
import support.run_directory

rank = os.environ.get("RANK", "0")
log = Path(f"{os.environ['COMMIT_LOG']}.{rank}")
commit = support.run_directory.commit


def logged_commit(partial: Path, path: Path) -> None:
    with log.open("a") as file:
        file.write(f"{path}\n")
    commit(partial, path)


def failing_training(*args, **kwargs):
    raise RuntimeError(f"failure injected into process {rank}")


support.run_directory.commit = logged_commit
if os.environ.get("FAIL_RANK") == rank:
    isi.train_adapter = failing_training
sys.exit(isi.main())
