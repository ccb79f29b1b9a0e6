"""A screenshot of TensorBoard's curves for a run (or a folder of runs), taken in a headless
browser (Debian's chromium) from a TensorBoard served on loopback only: docs/tensorboard.png.

    python bench/tensorboard_screenshot.py output/extended_run/smollm2-135m_pentest_seed0 docs/tensorboard.png

Needs the chromium package (apt-get install chromium); nothing leaves the machine.
"""
import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("png")
    parser.add_argument("--tags", default="probe/mean_score|probe/tools_accepted_rate|after/health/restate_rate|"
                        "after/health/copy_rate|probe/frozen_mean_score|train/loss_per_step",
                        help="TensorBoard's tag filter (a regular expression)")
    parser.add_argument("--size", default="1600,1100")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        parser.error("chromium is not installed (apt-get install chromium)")
    port = free_port()
    board = subprocess.Popen([str(Path(sys.executable).with_name("tensorboard")), "--logdir", args.logdir,
                              "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):  # TensorBoard reads the event files before it answers
            try:
                urllib.request.urlopen(url + "data/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        page = f"{url}?darkMode=false#scalars&tagFilter={urllib.parse.quote(args.tags)}&_smoothingWeight=0"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", "--virtual-time-budget=20000",
                        f"--screenshot={Path(args.png).resolve()}", page],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        board.terminate()
        board.wait(timeout=30)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
