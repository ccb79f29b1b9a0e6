"""The CPU's matrix products: frozen weights packed once for oneDNN, and LoRA merged for
generation (--cpu-matmul); the CPU's compute dtype (--precision auto).

torch's own CPU product reorders the weight at every call; over the 8 to 150 rows of a decode
step that is a large part of the work. Packing is measured once per machine (`auto`) and the
choice kept in the cache folder, so every run on a machine makes the same choice. Nothing here
runs on a GPU. docs/speed.md has the figures.

`--precision auto` is decided here too: bf16 where this machine's products are measured faster
in bf16 than in fp32 (choose_cpu_precision), kept in the cache folder the same way.

The rest may call: use_cpu_matmul, set_packed_products, merged_adapter, choose_cpu_matmul,
choose_cpu_precision, cpu_bf16_arithmetic, measured_once, time_products, can_pack, pack_weight,
packed_linear, frozen_linears, adapter_layers.
"""
import contextlib
import functools
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from support import UsageError, cache_root
from support.run_directory import write_json
from support.team import Team

if TYPE_CHECKING:  # a type hint only: support.model imports this module
    from support.model import LanguageModel


def frozen_linears(model) -> list:
    """The base model's plain linear layers, vocabulary head included: frozen for the whole run
    (LoRA's own layers train; 4-bit layers are bitsandbytes', not plain)."""
    import torch
    return [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def can_pack(lm: "LanguageModel") -> bool:
    import torch
    return (lm.device == "cpu" and lm.weights in ("float32", "bfloat16") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight, rows: int):
    """A weight [n x k] reordered once into oneDNN's layout, for products of about `rows` rows."""
    import torch
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def packed_linear(x, packed, bias=None):
    """x W^T + b, W packed by pack_weight."""
    import torch
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packed_product():
    """x W^T + b through W packed once into oneDNN's layout, and the gradient to x (W is frozen)
    through W^T packed likewise. torch's own CPU product reorders W at every call: over the 8 to
    150 rows of a decode step that is a large part of the work. A row's result does not depend
    on how many rows the call has."""
    import torch

    class PackedProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, transposed, bias):
            ctx.transposed = transposed
            return packed_linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            return packed_linear(grad.contiguous(), ctx.transposed), None, None, None
    return PackedProduct.apply


def set_packed_products(model, on: bool) -> None:
    """Install (or remove) packed products on every frozen linear layer. The packed weights, and
    their transposes for training, are two more copies of the base model's weights in memory."""
    product = packed_product()
    for module in frozen_linears(model):
        module.__dict__.pop("forward", None)  # back to the class's own forward
        if on:
            weight = module.weight.detach()
            packed = pack_weight(weight, 150), pack_weight(weight.t().contiguous(), 445)
            module.forward = lambda x, packed=packed, bias=module.bias: product(x, *packed, bias)


def adapter_layers(model) -> list:
    """peft's LoRA layers over plain linear layers (q, k, v, o here)."""
    import torch
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer) and type(m.get_base_layer()) is torch.nn.Linear]


@contextlib.contextmanager
def merged_adapter(lm: "LanguageModel"):
    """For a generation stage: each LoRA layer runs one product with W + s BA instead of the
    base product plus the adapter's two small ones and their sum: a CPU generate stage ran 12%
    faster, an inversion stage 10% (fp32, packed products, four alternated pairs).
    The merged weights are new tensors (packed like the frozen ones where products are packed):
    the base weights are never touched, since merging into them and back would not restore them
    exactly. Only fp32 weights: the result differs from the unmerged layer's in rounding only,
    where bf16 ones would lose much of the adapter's small update in the sum and 4-bit ones
    cannot hold it. Layers whose adapter is disabled (the frozen judge) stay as they are."""
    from torch.nn.functional import linear
    layers = []
    if lm.weights == "float32":
        layers = [m for m in adapter_layers(lm.model) if not m.disable_adapters and not m.merged
                  and any(a in m.lora_A for a in m.active_adapters)]
    try:
        for layer in layers:
            base = layer.get_base_layer()
            weight = base.weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            if lm.matmul == "packed":
                packed = pack_weight(weight, 150)
                layer.forward = lambda x, *args, packed=packed, bias=base.bias, **kwargs: packed_linear(x, packed, bias)
            else:
                layer.forward = lambda x, *args, weight=weight, bias=base.bias, **kwargs: linear(x, weight, bias)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def cpu_identity() -> str:
    """The CPU's model name and the instruction sets that decide its matrix-product kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    kernels = sorted(set(flags.group(1).split() if flags else ()) & {"avx2", "avx512f", "avx512_bf16", "amx_tile"})
    return " ".join([name.group(1).strip() if name else platform.machine(), *kernels])


def time_products(dtype, k: int, n: int) -> dict:
    """Seconds for 10 products [m x k] x [k x n] at m = 8 and 150 rows (the ends of a decode
    batch) and 445 (a training batch), torch's own and packed, best of 5 interleaved windows."""
    import torch
    torch.manual_seed(0)
    weight, xs = torch.randn(n, k, dtype=dtype), [torch.randn(m, k, dtype=dtype) for m in (8, 150, 445)]
    packed = pack_weight(weight, 150)
    products = {"plain": lambda x: torch.nn.functional.linear(x, weight), "packed": lambda x: packed_linear(x, packed)}
    best = dict.fromkeys(products, math.inf)
    with torch.inference_mode():
        for _ in range(5):
            for name, product in products.items():
                start = time.perf_counter()
                for x in xs:
                    for _ in range(10):
                        product(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose_cpu_matmul(lm: "LanguageModel", cfg) -> str:
    """--cpu-matmul, auto resolved on this machine: packed where it is at least 5% faster than
    torch's own product at the model's largest frozen shape, and the memory it adds (about five
    times the frozen weights) is at most a quarter of the machine's. Measured once per CPU, torch
    version, dtype and shape, and kept in the cache folder, so every run on a machine makes the
    same choice (the two differ in rounding)."""
    if cfg.cpu_matmul == "plain" or not can_pack(lm):
        if cfg.cpu_matmul == "packed" and lm.device == "cpu":
            raise UsageError("--cpu-matmul packed: needs plain fp32 or bf16 weights and PyTorch's oneDNN "
                             "(torch.backends.mkldnn); use --cpu-matmul plain")
        return "plain"
    if cfg.cpu_matmul == "packed":
        return "packed"
    import torch
    layers = frozen_linears(lm.model)
    # packing the embedded model's 0.54 GB of frozen weights raised a 2-cycle run's peak RSS by
    # 2.45 GB (2.95 -> 5.40 GB): the two copies and what oneDNN keeps with them
    extra = 5 * sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if extra > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4:
        return "plain"
    head = lm.model.get_base_model().get_output_embeddings()
    largest = max((m for m in layers if m is not head), key=lambda m: m.weight.numel())
    n, k = largest.weight.shape
    key = f"{cpu_identity()} | torch {torch.__version__} | {lm.dtype} | {k}x{n}"

    def measure() -> dict:
        seconds = time_products(largest.weight.dtype, k, n)
        return {"choice": "packed" if seconds["packed"] <= 0.95 * seconds["plain"] else "plain",
                "seconds": {name: round(s, 5) for name, s in seconds.items()}}
    return measured_once("cpu_matmul.json", key, measure, lambda v: v.get("choice") in ("packed", "plain"))["choice"]


def measured_once(file: str, key: str, measure, valid) -> dict:
    """A measurement of this machine, kept in the cache folder's `file` under `key`: read from
    there where it is (and `valid`), else made by `measure()` and written (a damaged file is
    measured again; an unwritable one, next time too)."""
    path = cache_root() / file
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if not isinstance(known.get(key), dict) or not valid(known[key]):
        known[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, known)
        except OSError:
            pass
    return known[key]


def cpu_bf16_arithmetic() -> bool:
    """Whether the CPU computes in bf16 (AVX512-BF16's dot products or AMX's tiles); elsewhere
    PyTorch emulates bf16, slower than fp32."""
    import torch
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check and check() for check in checks)


# bf16 where its products take at most this share of fp32's time: the two dtypes draw different
# samples, so the choice changes only for a clear gain
BF16_SHARE = 0.9
# below this many weights in the largest product (a test's 64 x 128 model), a product's time is
# mostly the call's overhead: fp32, without measuring (the embedded model's is 576 x 1536)
SMALLEST_BF16_PRODUCT = 2 ** 18


def choose_cpu_precision(k: int, n: int) -> tuple[str, str]:
    """--precision auto on the CPU: "bf16" or "fp32", and why (for the model line). bf16 where
    the products with the model's largest weight ([m x k] x [k x n] at m = 8, 150 and 445, the
    faster of torch's own and packed for each dtype) take at most 90% of fp32's time, measured
    once per CPU, torch version and shape and kept in the cache folder (cpu_precision.json), so
    every run on a machine makes the same choice; fp32 on a CPU without bf16 arithmetic, and for
    a model whose products are too small to measure (SMALLEST_BF16_PRODUCT)."""
    import torch
    if not cpu_bf16_arithmetic():
        return "fp32", "auto: this CPU has no bf16 arithmetic (neither AVX512-BF16 nor AMX)"
    if k * n < SMALLEST_BF16_PRODUCT:
        return "fp32", f"auto: the model's products ({k}x{n}) are too small for bf16 to gain"
    key = f"{cpu_identity()} | torch {torch.__version__} | {k}x{n}"

    def measure() -> dict:
        return {"seconds": {name: round(min(time_products(dtype, k, n).values()), 5)
                            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}
    seconds = measured_once("cpu_precision.json", key, measure,
                            lambda v: isinstance(v.get("seconds"), dict) and all(
                                isinstance(v["seconds"].get(d), (int, float)) and v["seconds"][d] > 0
                                for d in ("fp32", "bf16")))["seconds"]
    choice = "bf16" if seconds["bf16"] <= BF16_SHARE * seconds["fp32"] else "fp32"
    return choice, (f"auto: bf16's products ran {seconds['fp32'] / seconds['bf16']:.2f}x as fast as fp32's on "
                    f"this CPU, measured once, kept in cpu_precision.json in the cache folder")


def use_cpu_matmul(lm: "LanguageModel", cfg, team: Team = Team()) -> None:
    """Decide --cpu-matmul (the main process decides, every process takes its choice) and install it."""
    choice = team.everyone(team.together(lambda: choose_cpu_matmul(lm, cfg) if team.main else None))[0]
    set_packed_products(lm.model, choice == "packed")
    lm.matmul = choice
