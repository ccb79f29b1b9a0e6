"""Reads of the device back to the host in one cycle of the default run, counted (not timed).

On a GPU each read waits for the device to finish everything queued before it, so the GPU idles
while Python prepares the next step; with thousands of small kernels a step, the count of reads
is what matters, and it can be counted on the CPU. Every PyTorch call of one default cycle
(`--cycles 1`, the embedded model, its default evaluation) goes through a TorchFunctionMode
that counts the calls that read a tensor's values to the host: item, tolist, bool/int/float of a
tensor, numpy, cpu, nonzero, masked_select, unique, bincount, equal, allclose, indexing by a
boolean mask, repeat_interleave by a tensor of repeats (its output size). Each is attributed to
the innermost function of the project's code that made it (and the library function, where a
library made it). On the CPU every tensor is on the host, so a read of a tensor that a GPU run
keeps on the host is counted too (the optimizer's step counts are left out: host tensors on
every device); `.to(device)` is not counted (on the CPU, a copy to the device and a read look
alike). The count is the same rule for both trees compared.

    python bench/host_reads.py                      # this tree, the decoder at the GPU's read interval
    python bench/host_reads.py --root /tmp/old      # another checkout (its own decoder settings)

Prints the reads per function (most first) and the total, and writes them as JSON with --out.
About twice the cycle's own time (every PyTorch call goes through Python).
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def is_read(func, args, kwargs) -> bool:
    """Whether a PyTorch call reads a tensor's values to the host."""
    import torch
    tensor = torch.Tensor
    if func in (tensor.item, tensor.tolist, tensor.__bool__, tensor.__int__, tensor.__float__, tensor.__index__,
                tensor.numpy, tensor.cpu, tensor.nonzero, torch.nonzero, tensor.masked_select, torch.masked_select,
                torch.unique, tensor.unique, torch.bincount, tensor.bincount, torch.equal, tensor.equal,
                torch.allclose, tensor.allclose):
        return True
    if func in (tensor.__getitem__, tensor.__setitem__) and len(args) > 1:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)
    if func in (torch.repeat_interleave, tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return torch.is_tensor(repeats) and repeats.numel() > 1 and kwargs.get("output_size") is None
    return False


def counting_mode(on_read):
    """A TorchFunctionMode that calls on_read(func) before every read (is_read) it sees."""
    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if is_read(func, args, kwargs):
                on_read(func)
            return func(*args, **kwargs)
    return HostReads()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to count in")
    parser.add_argument("--read-every", type=int, default=None,
                        help="the decoder's steps between reads, where the checkout has the setting "
                             "(default: read_interval of a GPU)")
    parser.add_argument("--out", help="write the counts here as JSON")
    args, rest = parser.parse_known_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)
    import intrinsic_self_improvement as isi
    import support.decoder
    setting = "every step (no read interval in this checkout)"
    if hasattr(support.decoder, "read_interval"):
        read_every = args.read_every or support.decoder.read_interval("cuda")
        support.decoder.read_interval = lambda device: read_every
        setting = f"every {read_every} steps"
    ours = (str(root / "intrinsic_self_improvement.py"), str(root / "support"))
    counts: collections.Counter = collections.Counter()

    def where(func) -> str:
        """The innermost function of the project's code on the stack, and, where a library's code
        made the read, the library's function; then the read."""
        op = getattr(func, "__name__", str(func))
        frame, library = sys._getframe(3), None
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(ours):
                place = f"{Path(name).name}:{frame.f_code.co_name}"
                return f"{place} [{op}]" if library is None else f"{place} > {library} [{op}]"
            if library is None and "/torch/overrides.py" not in name and "/torch/utils/_device.py" not in name:
                parts = Path(name).parts
                library = f"{'/'.join(parts[-2:])}:{frame.f_code.co_name}"
            frame = frame.f_back
        return f"elsewhere > {library} [{op}]"

    phase = {"now": "start-up"}  # the cycle begins with its training (SELECT reads no tensor)
    real_train = isi.train_adapter

    def train_adapter(*args, **kwargs):
        phase["now"] = "cycle"
        return real_train(*args, **kwargs)
    isi.train_adapter = train_adapter

    def count(func) -> None:
        place = where(func)
        if "optim/optimizer.py:_get_value" not in place:  # the step counts: host tensors on every device
            counts[phase["now"], place] += 1

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, counting_mode(count):
        code = isi.main(["--cycles", "1", "--output", out, "--name", "count", *rest])
    print(f"\n{root}: decoder reads {setting} ({time.perf_counter() - start:.0f} s, exit {code})")
    totals = {}
    for now in ("start-up", "cycle"):
        print(f"  {now}{' (loading, cycle 0 probe)' if now == 'start-up' else ' 1'}:")
        for (when, place), n in counts.most_common():
            if when == now:
                print(f"  {n:7d}  {place}")
        totals[now] = sum(n for (when, _), n in counts.items() if when == now)
        print(f"  {totals[now]:7d}  in all")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "root": str(root), "decoder": setting, "totals": totals,
            "by_function": {f"{when} | {place}": n for (when, place), n in counts.most_common()}}, indent=2) + "\n")
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
