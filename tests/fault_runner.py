"""Runs intrinsic_self_improvement.main under an injected fault, for tests/test_faults.py.

A long-lived process that has imported the script and its libraries (~5 s) once, then forks one
child per request; the child counts calls of one hooked function and, at the chosen call, kills
itself with a real signal. The parent has run no model, so the fork copies no thread pools.

Requests on stdin, one JSON object a line: {"argv": [...], "hook": NAME, "at": N, "signal": "KILL"|"INT"|"TERM",
"log": PATH}. Answers on stdout, one JSON object a line: {"exit_code": int|null, "signal": int|null,
"calls": how many calls of the hook the child made}. Hooks:

  replace   os.replace, before the rename (every atomic commit of the run directory)
  torn      pathlib.Path.write_text, after half the text is written
  adapter   peft's safetensors save_file, after half the adapter file is written
  decode    support.decoder.decode_batch, before it runs (generation, mid-stage)
  train     intrinsic_self_improvement.train_adapter, before it runs
"""
import json
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft.peft_model  # noqa: E402
import torch  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401

import intrinsic_self_improvement as isi  # noqa: E402
import support.decoder  # noqa: E402


def install(hook: str, at: int, signum: int, counter: list) -> None:
    def fire():
        os.kill(os.getpid(), signum)

    def counted(original, before=True, halve=None):
        def wrapper(*args, **kwargs):
            counter[0] += 1
            if counter[0] == at:
                if halve:
                    halve(*args, **kwargs)
                    fire()
                elif before:
                    fire()
            return original(*args, **kwargs)
        return wrapper

    if hook == "replace":
        os.replace = counted(os.replace)
    elif hook == "torn":
        original = pathlib.Path.write_text
        pathlib.Path.write_text = counted(original, halve=lambda path, text, *a, **k: original(path, text[:len(text) // 2]))
    elif hook == "adapter":
        original = peft.peft_model.safe_save_file

        def half_file(tensors, filename, *args, **kwargs):
            original(tensors, filename, *args, **kwargs)
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
        peft.peft_model.safe_save_file = counted(original, halve=half_file)
    elif hook in ("decode", "train"):
        # patched where the code looks it up: the decoder calls decode_batch, the loop train_adapter
        where, name = {"decode": (support.decoder, "decode_batch"), "train": (isi, "train_adapter")}[hook]
        setattr(where, name, counted(getattr(where, name)))
    else:
        raise SystemExit(f"unknown hook {hook}")


def child(request: dict, counts_fd: int) -> None:
    counter = [0]
    install(request["hook"], request["at"], getattr(signal, "SIG" + request["signal"]), counter)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        code = isi.main(request["argv"])
    finally:
        os.write(counts_fd, f"{counter[0]}\n".encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child(request, write_end)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as counts:
            calls = counts.read().strip()
        print(json.dumps({"exit_code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
                          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "calls": int(calls) if calls else None}), flush=True)


if __name__ == "__main__":
    main()
