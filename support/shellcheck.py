"""Debian's `shellcheck`, the static analyser, over many commands in one call (it reads them; it
runs nothing, so it is safe outside the sandbox). One level of the execution ladder.

The rest may call: shellcheck_available, error_free.
"""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_S = 120.0  # for one call over a whole batch (about 1.5 ms a command where measured)


def shellcheck_available() -> bool:
    return shutil.which("shellcheck") is not None


def error_free(commands: list[str]) -> list[bool] | None:
    """Per command: shellcheck (as bash) reports no error-level finding. None when shellcheck
    is missing, or fails or hangs on the batch."""
    if not shellcheck_available():
        return None
    if not commands:
        return []
    with tempfile.TemporaryDirectory(prefix="shellcheck-") as folder:
        paths = []
        for k, command in enumerate(commands):
            path = Path(folder) / f"c{k}.sh"
            path.write_text(command.replace("\0", "") + "\n")
            paths.append(str(path))
        try:
            done = subprocess.run(["shellcheck", "--shell=bash", "--severity=error", "--format=json1",
                                   *paths], capture_output=True, text=True, timeout=TIMEOUT_S)
            comments = json.loads(done.stdout or "{}").get("comments", [])
        except (subprocess.TimeoutExpired, OSError, ValueError):
            return None
    flagged = {Path(c["file"]).name for c in comments if c.get("level") == "error"}
    return [f"c{k}.sh" not in flagged for k in range(len(commands))]
