"""The prepared GPU check: does the published configuration's path (Mistral-7B's shape in 4-bit NF4
with LoRA, bf16 compute) run on one GPU as the project says, and how fast? Random weights in the
model's shape (the device machine cannot reach the model hub), built once. Stages, each writing
the JSON again when it ends, so a timeout keeps what ran:

  environment          driver, GPU, library versions, which bitsandbytes library loaded (a missing
                       nvidia-smi is recorded, not fatal)
  build                the random model, written to disk once (reused by every later stage, and by
                       a second run given the same --scratch)
  load_4bit            load time, memory, the dtypes of weights, activations and the KV cache
  decoder_vs_generate  generate's greedy tokens scored by the decoder (teacher forcing), their
                       log-probabilities within a stated tolerance of generate's; and the greedy
                       tokens' agreement up to the first divergence, counted, one prompt at a time
  decode_steps         ms per decode step at 150, 20 and 4 rows; GPU-busy time against wall time; at
                       150 rows the chosen tokens read back every step against every 4 (the default)
  qlora_steps          ten QLoRA steps (ms, peak memory) and the LoRA gradients finite, non-zero
  cli                  the script end to end: 2 cycles at 50 x 3, then --resume to 3; each
                       invocation's exit code (or "timed out"), time and last output written as it ends
  stopping             150 rows made to stop at varied steps (a hook forces EOS with a small
                       probability), so the decoder's stopping and cache compaction run
  memory               peak memory decoding 150 and 640 rows to the command cap (48 tokens),
                       allocated and reserved
  bf16                 the same model with bf16 weights: load, dtypes, ms per step at 150 rows
  collective           NCCL (gloo on the CPU) with one process: an all-reduce

The stages run in that order, of value: a check cut short keeps what matters most. A stage that
fails is listed under "failed" with its error, and the next one runs; the JSON is written again
after every stage (and after each of the CLI's two invocations). With --budget SECONDS a stage
that would not fit in what is left (by ESTIMATE_S, guesses until a GPU run measures them) is
skipped and listed under "skipped", and the CLI's invocations shrink their limits to fit.

On one H100 or H200 (the device tool's machine has PyTorch but not the pinned transformers,
peft or any bitsandbytes), here, once, in the repository's root:

    .venv/bin/python bench/gpu_check.py --prepare-wheels .whl    # 17.4 MiB, under the 64 MiB a call carries

(.gitignore keeps .whl out of git), then with the device tool, a call of at most about seven of
the session's fifteen device minutes with the machine's start (five and a half of checking: the
stages up to the CLI, and the CLI in what is left), leaving room for a second:

    run(command="python3 bench/gpu_check.py --wheels .whl --budget 320 --scratch /tmp/gpu-check --out $OUT/gpu_check.json", carry=[".whl"], timeout_s=340)

A second call on the still-warm machine with `--scratch /tmp/gpu-check` and `--stages` naming what
the first skipped or failed reuses the built model. Without --budget every stage runs (about ten
minutes, by the estimates).

--wheels unpacks the carried wheels into /tmp/site and runs the check again with
PYTHONPATH=/tmp/site, MISTRAL_V1_TOKENIZER=.whl/tokenizer.model.v1 and PYTHONUNBUFFERED=1.
Its CPU path (`--device cpu`: a 2-layer model, small rows and caps, seconds) runs in `make test`.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTED = time.time()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# the pinned libraries the device machine lacks (its own torch stays), and of bitsandbytes' 16
# native libraries the one for the device's CUDA 13.0 (torch 2.11.0+cu130 there)
WHEELS = ["bitsandbytes==0.50.2", "transformers==5.23.0", "peft==0.21.2"]
BITSANDBYTES_LIBRARY = "libbitsandbytes_cuda130.so"
SITE = Path("/tmp/site")


def prepare_wheels(folder: Path) -> None:
    """Here: download the wheels for the device's Python 3.12, keep bitsandbytes' Python files and
    one native library, and add Mistral's tokenizer file."""
    import shutil
    import tempfile
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[arg for n in (28, 24, 17) for arg in ("--platform", f"manylinux_2_{n}_x86_64")],
                        "--platform", "manylinux2014_x86_64", "-d", scratch, *WHEELS], check=True)
        for wheel in Path(scratch).glob("*.whl"):
            if not wheel.name.startswith("bitsandbytes"):
                shutil.copy(wheel, folder / wheel.name)
                continue
            with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(folder / wheel.name, "w",
                                                                   zipfile.ZIP_DEFLATED) as slim:
                for item in source.infolist():
                    if not item.filename.endswith(".so") or item.filename.endswith(BITSANDBYTES_LIBRARY):
                        slim.writestr(item, source.read(item))
    import bench_cycle
    shutil.copy(bench_cycle.MISTRAL_V1_TOKENIZER, folder / "tokenizer.model.v1")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}; {size / 2**20:.1f} MiB")


def run_with_wheels(folder: Path, argv: list[str]) -> int:
    """There: the wheels unpacked (a wheel is a zip of its installed files), then this check again
    in a process that imports them first."""
    SITE.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as unpacked:
            unpacked.extractall(SITE)
    env = dict(os.environ, PYTHONPATH=f"{SITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               MISTRAL_V1_TOKENIZER=str((folder / "tokenizer.model.v1").resolve()), PYTHONUNBUFFERED="1",
               GPU_CHECK_STARTED=str(STARTED))  # --budget counts from here
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------

class Check:
    """The run's settings, what the stages share (the model folder, the loaded model), and the
    figures, written after every stage."""

    def __init__(self, args):
        self.args, self.device, self.shape = args, args.device, args.shape
        self.cuda = args.device == "cuda"
        small = self.shape == "tiny"
        # rows and caps: the published ones on the GPU; on the CPU the same stages, smaller
        self.command_tokens = 48 if not small or self.cuda else 8
        self.step_rows = (150, 20, 4)
        self.memory_rows = (150, 640) if self.cuda else (16, 64)
        self.figures = {"device": args.device, "shape": args.shape, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "budget_s": args.budget, "failed": [], "skipped": []}
        self.model_dir, self.lm, self.cfg = None, None, None

    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(self.figures, indent=2) + "\n")
        os.replace(partial, out)

    def left_s(self) -> float | None:
        """Seconds of --budget left (counted from the first process's start), or None: no budget."""
        if self.args.budget is None:
            return None
        return self.args.budget - (time.time() - float(os.environ.get("GPU_CHECK_STARTED", STARTED)))

    def run(self, name: str, stage) -> None:
        left, needs = self.left_s(), ESTIMATE_S.get(name, 0)
        if left is not None and needs > left and name not in ("environment", "build"):
            self.figures["skipped"].append({"stage": name, "why": f"needs about {needs} s, {left:.0f} s of "
                                                                  f"--budget left"})
            print(f"[{time.strftime('%H:%M:%S')}] {name}: skipped (needs about {needs} s, {left:.0f} s left)",
                  flush=True)
            self.write()
            return
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        try:
            figures = stage(self)
            figures["seconds"] = round(time.perf_counter() - start, 2)
            self.figures[name] = figures
            print(f"  {json.dumps(figures)[:600]}", flush=True)
        except BaseException as err:  # noqa: BLE001: a failed stage is a finding; the next stage runs
            if isinstance(err, KeyboardInterrupt):
                raise
            self.figures["failed"].append({"stage": name, "error": f"{type(err).__name__}: {err}"[:1000],
                                           "seconds": round(time.perf_counter() - start, 2),
                                           "traceback": traceback.format_exc()[-3000:]})
            print(f"  FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
        self.write()

    def config(self, *extra: str):
        import intrinsic_self_improvement as isi
        return isi.parse_config(["--model", str(self.model_dir), "--device", self.device, *extra])

    def synchronize(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        import bench_cycle
        return bench_cycle.peak_memory_gib(self.device)

    def four_bit(self):
        """The 4-bit model the stages measure: load_4bit's, loaded again where a stage before
        freed it (the CLI's run) or replaced it (bf16)."""
        if self.lm is None or self.lm.weights != "nf4":
            self.figures.setdefault("reloaded_4bit", []).append(load_4bit(self)["load_s"])
        return self.lm

    def prompts(self, n: int) -> list[list[int]]:
        """n distinct command prompts of the default task domain."""
        import intrinsic_self_improvement as isi
        import support.tasks
        tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), n, random.Random(n))
        return [isi.prompt_ids(self.lm.tokenizer, isi.command_request(t)) for t in tasks]


def environment(check: Check) -> dict:
    import importlib.metadata
    import platform
    import torch
    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "cpu": platform.processor() or platform.machine()}
    for package in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            figures[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            figures[package] = None
    if check.cuda:
        figures["gpu"] = torch.cuda.get_device_name()
        figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:  # recorded, not fatal
            figures["nvidia_smi"] = f"not available: {type(err).__name__}: {err}"
    import bitsandbytes.cextension
    library = getattr(getattr(bitsandbytes.cextension.lib, "_lib", None), "_name", None)
    figures["bitsandbytes_library"] = Path(library).name if library else None
    figures["bitsandbytes_from"] = str(Path(bitsandbytes.__file__).parent)
    return figures


def build(check: Check) -> dict:
    """The random model in the shape, written once (in a process of its own: building 7B in bf16
    must not count in this process's memory)."""
    import tempfile
    import bench_cycle
    scratch = Path(check.args.scratch or tempfile.mkdtemp(prefix="gpu-check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "model"
    if not (target / "config.json").is_file():
        bench_cycle.random_model_dir(check.shape, scratch)
    check.model_dir = target
    size = sum(p.stat().st_size for p in target.iterdir())
    return {"model_dir": str(target), "gib_on_disk": round(size / 2**30, 2)}


def dtypes_seen(lm) -> dict:
    """The dtypes of the weights by kind, of every module's output in one forward pass, and of
    the KV cache it filled."""
    import torch
    import support.decoder
    model, seen, hooks = lm.model, set(), []
    for module in model.modules():
        def hook(_, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(first) and first.is_floating_point():
                seen.add(str(first.dtype).removeprefix("torch."))
        hooks.append(module.register_forward_hook(hook))
    cache = support.decoder.decode_cache(room=2)
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3, 4]], device=lm.device), past_key_values=cache, use_cache=True)
    finally:
        for handle in hooks:
            handle.remove()

    def kinds(test) -> list[str]:
        return sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if test(n)})
    return {"activations": sorted(seen), "kv_cache": sorted({str(layer.keys.dtype).removeprefix("torch.")
                                                               for layer in cache.layers}),
            "norm_weights": kinds(lambda n: "norm" in n), "lora_weights": kinds(lambda n: "lora_" in n),
            "embedding_and_head": kinds(lambda n: "embed_tokens" in n or "lm_head" in n),
            "linear_weights": kinds(lambda n: n.endswith("base_layer.weight") or ".mlp." in n)}


def load(check: Check, *flags: str) -> dict:
    import gc
    import torch
    import bench_cycle
    import support.model
    check.lm = None
    gc.collect()
    if check.cuda:
        torch.cuda.empty_cache()
    check.reset_peak()
    start = time.perf_counter()
    check.cfg = check.config(*flags)
    check.lm = support.model.load_language_model(check.cfg)
    check.synchronize()
    return {"load_s": round(time.perf_counter() - start, 1), "compute_dtype": check.lm.dtype,
            "weights": check.lm.weights, "model_gib": bench_cycle.model_memory_gib(check.lm.model),
            "peak_gib": check.peak_gib(), "dtypes": dtypes_seen(check.lm)}


def load_4bit(check: Check) -> dict:
    return load(check, "--quantize", "4bit", "--precision", "bf16")


class HeadHook:
    """A forward hook on the LM head for the length of a `with`: `force(module, inputs, logits)`
    sees (and may change) each step's logits."""

    def __enter__(self):
        head = self.lm.model.get_base_model().get_output_embeddings()
        self.handle = head.register_forward_hook(self.force)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class ForcedStops(HeadHook):
    """Each row's next token is EOS with probability p, so rows of random weights (which never
    stop by themselves) stop at varied steps."""

    def __init__(self, lm, p: float, seed: int = 0):
        import torch
        self.lm, self.p = lm, p
        self.generator = torch.Generator(device=lm.device).manual_seed(seed)
        self.eos = lm.tokenizer.eos_token_id

    def force(self, _, inputs, logits):
        import torch
        rows = torch.rand(logits.shape[0], generator=self.generator, device=logits.device) < self.p
        logits[rows, ..., self.eos] = logits.max() + 100
        return logits


def stopping(check: Check) -> dict:
    """150 rows (50 prompts x 3) sampled as the loop does, each stopping with probability 0.05 a
    step; counts the compactions (a row or more leaving the batch)."""
    import support.decoder
    compactions = []
    real = support.decoder.compacted

    def counted(keep):
        compactions.append(len(keep))
        return real(keep)
    support.decoder.compacted = counted
    try:
        with ForcedStops(check.four_bit(), 0.05):
            start = time.perf_counter()
            out = support.decoder.decode(check.lm, check.prompts(50), copies=3, temperature=0.7,
                                         max_new_tokens=check.command_tokens, batch_size=150, seed=0, desc="stopping")
            check.synchronize()
    finally:
        support.decoder.compacted = real
    lengths = [len(check.lm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in out.texts]
    return {"rows": len(out.texts), "distinct_lengths": len(set(lengths)), "compactions": len(compactions),
            "tokens": out.tokens, "decode_s": round(time.perf_counter() - start, 2),
            "tokens_per_s": round(out.tokens / (time.perf_counter() - start), 1)}


class ForcedTokens(HeadHook):
    """Teacher forcing through the decoder's own cached path: at its step k the decoder takes
    tokens[k], and the log-probability the model gave that token (before the forcing) is
    recorded. One prompt, one row."""

    def __init__(self, lm, tokens: list[int]):
        self.lm, self.tokens, self.logprobs = lm, tokens, []

    def force(self, _, inputs, logits):
        import torch
        k = len(self.logprobs)
        if k < len(self.tokens):
            self.logprobs.append(torch.log_softmax(logits[0].float(), -1)[self.tokens[k]].item())
            logits[0, self.tokens[k]] = logits.max() + 100
        return logits


# The decoder feeds a prompt's last token on its own (bitsandbytes' one-row path) where generate
# prefills it with the rest: in bf16 or fp16 their log-probabilities differ by about 1e-3 to 1e-2,
# by rounding alone; a defect (a wrong position, a wrong mask, a stale cache row) moves them by far more
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.05, "float16": 0.05}


def decoder_vs_generate(check: Check) -> dict:
    """Greedy, one prompt at a time, against transformers' generate on the same model (adapter
    attached): generate's own tokens scored by the decoder (teacher forcing through its cache),
    their log-probabilities within LOGPROB_TOLERANCE of generate's; and the greedy tokens' agreement
    up to the first divergence, a count (a flip between two near-equal logits is rounding, not a
    defect, and after it the two continue different texts)."""
    import torch
    import support.decoder
    lm, prompts, steps = check.four_bit(), check.prompts(4), 8
    agreement, largest = [], 0.0
    generator = torch.Generator(device=lm.device).manual_seed(0)
    with torch.inference_mode():
        for prompt in prompts:
            ours, _, _ = support.decoder.decode_batch(lm, [prompt], copies=1, temperature=0, max_new_tokens=steps,
                                                      line_done=None, generator=generator)
            theirs = lm.model.generate(input_ids=torch.tensor([prompt], device=lm.device), do_sample=False,
                                       max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                                       return_dict_in_generate=True, pad_token_id=lm.tokenizer.pad_token_id)
            tokens = theirs.sequences[0, len(prompt):].tolist()
            agreement.append(next((k for k, (a, b) in enumerate(zip(ours[0], tokens)) if a != b),
                                  min(len(ours[0]), len(tokens))))
            theirs_logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                               for step, t in zip(theirs.logits, tokens)]
            with ForcedTokens(lm, tokens) as forced:
                support.decoder.decode_batch(lm, [prompt], copies=1, temperature=0, max_new_tokens=len(tokens),
                                             line_done=None, generator=generator)
            if len(forced.logprobs) != len(tokens):
                raise RuntimeError(f"teacher forcing scored {len(forced.logprobs)} of {len(tokens)} tokens")
            largest = max([largest] + [abs(a - b) for a, b in zip(forced.logprobs, theirs_logprobs)])
    tolerance = LOGPROB_TOLERANCE[lm.dtype]
    return {"prompts": len(prompts), "steps": steps, "greedy_agreement": agreement,
            "tokens_equal": sum(k == steps for k in agreement), "max_logprob_difference": round(largest, 5),
            "tolerance": tolerance, "within_tolerance": largest <= tolerance}


def ms_per_step(check: Check, rows: int, steps: tuple[int, int] = (4, 20), profile: bool = False,
                read_every: int | None = None) -> dict:
    """Decode-step time at `rows` rows, without the prefill: two runs of different lengths, the
    difference over the extra steps. With `profile`, the share of the longer run's wall time the
    GPU spent in kernels. `read_every`: the decoder's steps between reads of the chosen tokens
    (its default for the device otherwise)."""
    import torch
    import support.decoder
    per_prompt = 3 if rows > 50 else 1  # the loop's batches: 50 tasks x 3 candidates; the probe: 20 tasks, greedy
    prompts = check.prompts(max(1, rows // per_prompt))
    generator = torch.Generator(device=check.lm.device).manual_seed(0)

    def decode(n: int) -> float:
        check.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            support.decoder.decode_batch(check.lm, prompts, copies=per_prompt, temperature=0.7, max_new_tokens=n,
                                         line_done=None, generator=generator, read_every=read_every)
        check.synchronize()
        return time.perf_counter() - start
    decode(steps[0])  # warm-up
    short, long = decode(steps[0]), decode(steps[1])
    figures = {"rows": len(prompts) * per_prompt, "ms_per_step": round(1000 * (long - short) / (steps[1] - steps[0]), 2),
               "gpu_busy_share": None}
    if profile and check.cuda:
        from torch.profiler import ProfilerActivity, profile as profiler
        with profiler(activities=[ProfilerActivity.CUDA]) as prof:
            wall = decode(steps[1])
        busy_us = sum(e.self_device_time_total for e in prof.key_averages())
        figures["gpu_busy_share"] = round(busy_us / 1e6 / wall, 3)
        figures["profiled_wall_s"] = round(wall, 3)
    return figures


def decode_steps(check: Check) -> dict:
    """ms per step at the loop's row counts; at 150 rows, also with the chosen tokens read back
    every step and every 4 (the device's default: is the GPU kept busier?)."""
    import support.decoder
    check.four_bit()
    figures = {"4bit": {str(rows): ms_per_step(check, rows, profile=True) for rows in check.step_rows},
               "default_read_every": support.decoder.read_interval(check.lm.device)}
    figures["150_read_every"] = {str(n): ms_per_step(check, 150, profile=True, read_every=n) for n in (1, 4)}
    return figures


def memory(check: Check) -> dict:
    """Peak memory decoding `rows` rows to the command cap (no row stops: random weights).
    On the CPU the process's peak RSS, which only grows."""
    import torch
    import support.decoder
    check.four_bit()
    figures = {}
    for rows in check.memory_rows:
        check.reset_peak()
        prompts = check.prompts(rows // 2)
        generator = torch.Generator(device=check.lm.device).manual_seed(0)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                support.decoder.decode_batch(check.lm, prompts, copies=2, temperature=0.7,
                                             max_new_tokens=check.command_tokens, line_done=None, generator=generator)
            check.synchronize()
            figures[str(rows)] = {"peak_gib": check.peak_gib(), "decode_s": round(time.perf_counter() - start, 2)}
            if check.cuda:  # what the caching allocator holds, beside what tensors hold
                figures[str(rows)]["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        except torch.OutOfMemoryError as err:
            figures[str(rows)] = {"out_of_memory": str(err)[:300]}
    return figures


def qlora_steps(check: Check) -> dict:
    """Ten optimizer steps at batch 4 through the loop's own training, then one backward pass to
    read the LoRA gradients."""
    import torch
    import intrinsic_self_improvement as isi
    import support.tasks
    lm = check.four_bit()
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 40, random.Random(1))
    pairs = [(task, f"nmap -p 22,80 10.0.0.{k}") for k, task in enumerate(tasks)]
    check.reset_peak()
    trained = isi.train_adapter(lm, check.cfg, pairs, seed=0)
    peak = check.peak_gib()
    lm.model.train()
    batch = isi.collate([isi.command_example(lm.tokenizer, t, c) for t, c in pairs[:4]], lm.tokenizer.pad_token_id)
    loss, _ = isi.completion_loss(lm.model, {k: v.to(lm.device) for k, v in batch.items()})
    loss.backward()
    grads = [p.grad for n, p in lm.model.named_parameters() if "lora_" in n]
    lm.model.zero_grad(set_to_none=True)
    lm.model.eval()
    return {"steps": trained["steps"], "ms_per_step": round(1000 * trained["train_s"] / trained["steps"], 1),
            "loss_first": trained["loss_first"], "loss_last": trained["loss_last"], "peak_gib": peak,
            "lora_gradients_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
            "lora_gradients_nonzero": sum(bool(g is not None and g.abs().sum() > 0) for g in grads) >= len(grads) // 2,
            "lora_gradient_dtype": sorted({str(g.dtype) for g in grads if g is not None})}


def bf16(check: Check) -> dict:
    figures = load(check, "--quantize", "none", "--precision", "bf16")
    check.reset_peak()
    figures["decode_150"] = ms_per_step(check, 150)
    figures["decode_peak_gib"] = check.peak_gib()
    return figures


def collective(check: Check) -> dict:
    """One process's all-reduce over loopback, through the backend a multi-GPU run uses."""
    import socket
    import torch
    import torch.distributed as dist
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if check.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.ones(1, device=check.device)
        dist.all_reduce(value)
        return {"backend": backend, "sum": value.item()}
    finally:
        dist.destroy_process_group()


def cli(check: Check) -> dict:
    """The script as a user runs it: 2 cycles, then --resume to 3 (random weights: rows run to
    their caps; threshold 0 so every cycle trains)."""
    check.lm = None
    if check.cuda:
        import torch
        torch.cuda.empty_cache()
    run = [sys.executable, str(ROOT / "intrinsic_self_improvement.py"), "--model", str(check.model_dir),
           "--device", check.device, "--scorer", "lexical", "--threshold", "0",
           "--output", str(Path(check.args.scratch or check.model_dir.parent) / "cli"), "--name", "run"]
    if check.shape == "tiny" and not check.cuda:
        run += ["--tasks", "4", "--candidates", "2", "--probe-tasks", "2", "--max-command-tokens", "6",
                "--max-inversion-tokens", "6"]
    else:
        run += ["--tasks", "50", "--candidates", "3"]
    figures = check.figures["cli"] = {"returncodes": []}  # written after each invocation, whatever happens
    for label, extra in (("first", ["--cycles", "2"]), ("resumed", ["--cycles", "3", "--resume"])):
        start, timeout = time.perf_counter(), check.args.cli_timeout
        if check.left_s() is not None:  # the rest of the budget, shared by the invocations left
            timeout = min(timeout, max(30, int((check.left_s() - 15) / (2 if label == "first" else 1))))
        figures[f"{label}_timeout_s"] = timeout
        try:
            done = subprocess.run(run + extra, capture_output=True, text=True, timeout=timeout)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:  # what it printed before the limit is the evidence
            code, output = "timed out", "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                                                for part in (err.stdout, err.stderr) if part)
        figures["returncodes"].append(code)
        figures[f"{label}_s"] = round(time.perf_counter() - start, 1)
        figures[f"{label}_tail"] = output[-1500:]
        check.write()
        if code != 0:
            break
    progress = Path(run[run.index("--output") + 1]) / "run" / "progress.json"
    figures["last_completed_cycle"] = (json.loads(progress.read_text())["last_completed_cycle"]
                                       if progress.exists() else None)
    return figures


# in order of value, so that a check cut short keeps what matters most: the 4-bit path loads, the
# decoder agrees with generate, decode speed, QLoRA steps, the script end to end; then the rest
STAGES = [environment, build, load_4bit, decoder_vs_generate, decode_steps, qlora_steps, cli, stopping, memory,
          bf16, collective]

# Seconds each stage is expected to take on one H100 (Mistral-7B's shape), for --budget: guesses
# from the work each does (14.5 GB written and read, 4-bit quantization, a few hundred decode steps),
# not yet measured on a GPU; the first run's "seconds" replace them. The CLI's is the least it
# is started with: it takes what is left (each invocation's limit shrinks to fit).
ESTIMATE_S = {"environment": 10, "build": 60, "load_4bit": 45, "decoder_vs_generate": 15, "decode_steps": 40,
              "qlora_steps": 20, "cli": 120, "stopping": 20, "memory": 30, "bf16": 60, "collective": 5}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shape", choices=["mistral-7b", "tiny"], help="default: mistral-7b on cuda, tiny on cpu")
    parser.add_argument("--out", default="output/gpu_check.json")
    parser.add_argument("--scratch", help="where the random model and the CLI's run go (default: a new temporary folder)")
    parser.add_argument("--stages", help="a comma-separated subset (build always runs)")
    parser.add_argument("--cli-timeout", type=int, default=400, help="seconds for each of the two CLI invocations")
    parser.add_argument("--budget", type=float, help="seconds for the whole check: a stage that would not fit "
                                                     "is skipped and listed under 'skipped' (default: no limit)")
    parser.add_argument("--wheels", help="a folder of wheels to unpack and import first (the device machine)")
    parser.add_argument("--prepare-wheels", help="download and slim the wheels into this folder (here), then stop")
    args = parser.parse_args(argv)
    if args.prepare_wheels:
        prepare_wheels(Path(args.prepare_wheels))
        return 0
    if args.wheels:
        rest = [a for k, a in enumerate(argv) if a != "--wheels" and (k == 0 or argv[k - 1] != "--wheels")]
        return run_with_wheels(Path(args.wheels), [a for a in rest if not a.startswith("--wheels=")])
    args.shape = args.shape or ("mistral-7b" if args.device == "cuda" else "tiny")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check = Check(args)
    chosen = set(args.stages.split(",")) | {"build"} if args.stages else {s.__name__ for s in STAGES}
    for stage in STAGES:
        if stage.__name__ in chosen:
            check.run(stage.__name__, stage)
    check.figures["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    check.write()
    print(f"wrote {args.out}; failed stages: {[f['stage'] for f in check.figures['failed']] or 'none'}")
    return 1 if check.figures["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
