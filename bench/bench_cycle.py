"""One cycle's stages, twice on the same model, tasks and seed: in the published call pattern
(one `generate` per sample: 100 new tokens for a command, 50 for an inversion, 5 for a rating;
training on examples padded to 512 tokens with the loss over every position) and through the
project's own code path. Both train on the same pairs: every candidate with a command, the most
a cycle can accept. Scoring is the published mix (with the self-rating) in both. Prints seconds per stage, tokens/s, peak memory and the ratio, and
writes them as JSON.

    # this machine, embedded SmolLM2-135M, the published 50 x 3 (about 20 minutes, mostly the published pattern)
    python bench/bench_cycle.py --out output/bench_cpu.json
    # a quick look (seconds): a tiny random model, 4 x 2
    python bench/bench_cycle.py --random-config tiny --tasks 4 --candidates 2 --out output/bench_tiny.json
    # one GPU: Mistral-7B's shape and tokenizer with random weights, 4-bit NF4 + LoRA, then bf16
    python bench/bench_cycle.py --random-config mistral-7b --quantize 4bit --out output/bench_gpu_4bit.json
    python bench/bench_cycle.py --random-config mistral-7b --quantize none --out output/bench_gpu_bf16.json
    # the same 4-bit path on the CPU: memory, one small cycle (a 7B model decodes slowly on two cores)
    python bench/bench_cycle.py --random-config mistral-7b --quantize 4bit --tasks 1 --candidates 2 \
        --max-command-tokens 8 --max-inversion-tokens 8 --skip-published --out output/bench_cpu_7b_4bit.json
"""
import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
import support.cpu_products
import support.model
import support.tasks

PUBLISHED_TOKENS = {"command": 100, "inversion": 50, "rating": 5}


# Mistral-7B-Instruct-v0.2's tokenizer is the v1 sentencepiece file that mistral-common ships; the
# Makefile installs that package here, off the import path (installed, it changes AutoTokenizer).
# MISTRAL_V1_TOKENIZER names the file elsewhere (a GPU machine: bench/gpu_check.py --wheels).
MISTRAL_V1_TOKENIZER = Path(os.environ.get("MISTRAL_V1_TOKENIZER") or
                            Path(sys.prefix) / "mistral-common" / "mistral_common" / "data" / "tokenizer.model.v1")
# Mistral-7B-Instruct-v0.2's published chat template: BOS written into the text, user and
# assistant roles only, alternating; anything else raises.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def mistral_tokenizer(scratch: Path):
    """Mistral-7B-Instruct-v0.2's tokenizer: the v1 sentencepiece model, the published template and
    special tokens (BOS added, no EOS added, no pad token). Converting it needs sentencepiece and
    protobuf once; the saved folder needs neither."""
    import shutil
    from transformers import AutoTokenizer
    shutil.copy(MISTRAL_V1_TOKENIZER, scratch / "tokenizer.model")
    (scratch / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "chat_template": MISTRAL_CHAT_TEMPLATE}))
    return AutoTokenizer.from_pretrained(scratch)


def write_random_model(kind: str, target: Path) -> None:
    """Random weights in a model's shape. mistral-7b: Mistral-7B's config and its own tokenizer,
    created directly in bf16 (fp32 would need 29 GB); tiny: 2 layers with the embedded tokenizer.
    Random weights never emit EOS: every sequence runs to its cap."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM
    if kind == "mistral-7b":
        (target / "tokenizer-source").mkdir()
        tokenizer = mistral_tokenizer(target / "tokenizer-source")
        config = MistralConfig(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                               max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)
    else:
        tokenizer = AutoTokenizer.from_pretrained(support.model.embedded_model_dir())
        config = MistralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                               hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if kind == "mistral-7b" else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(target / "model")
    tokenizer.save_pretrained(target / "model")


def write_tiny_llama(path: Path) -> Path:
    """The tests' tiny model: a 2-layer Llama with random weights (seed 0) and the embedded model's
    tokenizer, standing in for a hub model given by path (chat template, pad = EOS, no hub access)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(support.model.embedded_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_model_dir(kind: str, scratch: Path) -> Path:
    """write_random_model in a process of its own, so that building a 7B model (14.5 GB in bf16)
    does not count in this process's peak memory."""
    import multiprocessing
    child = multiprocessing.get_context("spawn").Process(target=write_random_model, args=(kind, scratch))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"building the random {kind} model failed (exit code {child.exitcode})")
    return scratch / "model"


def peak_memory_gib(device: str) -> float:
    import torch
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # process peak RSS


def model_memory_gib(model) -> float:
    """Bytes the model's tensors hold: parameters (4-bit layers: their packed bytes), buffers, and
    4-bit quantisation constants (absmax, double-quantised, and the code book)."""
    import torch
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += sum(v.nbytes for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor))
    return round(total / 2**30, 2)


def anonymous_memory_gib() -> float | None:
    """Resident memory not backed by a file, now: on the CPU the peak RSS also counts the pages of
    the checkpoint that loading reads through a memory map, which the kernel can drop at will."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), None)
    return None if kib is None else round(kib / 2**20, 2)


def reset_peak(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def timed(device: str, fn):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The published call pattern
# ---------------------------------------------------------------------------------------------

def generate_one_by_one(lm, requests: list[str], max_new_tokens: int, temperature: float, seed: int):
    """One `model.generate` call per sample, as the published script does."""
    import torch
    tok, texts, tokens = lm.tokenizer, [], 0
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    for request in requests:
        inputs = tok(isi.chat_prompt(tok, request), add_special_tokens=False, return_tensors="pt").to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
        new = out[0, inputs["input_ids"].shape[1]:]
        tokens += len(new)
        texts.append(tok.decode(new, skip_special_tokens=True))
    return texts, tokens


def published_train(lm, cfg, pairs, seed: int) -> dict:
    """Examples padded to 512 tokens, labels = input_ids (the loss includes the padding)."""
    import torch
    tok, model = lm.tokenizer, lm.model
    torch.manual_seed(seed)
    texts = [isi.chat_prompt(tok, isi.command_request(task)) + command + tok.eos_token for task, command in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    model.train()
    losses = []
    for first in range(0, len(texts), cfg.batch_size):
        batch = tok(texts[first:first + cfg.batch_size], padding="max_length", max_length=512, truncation=True,
                    add_special_tokens=False, return_tensors="pt").to(lm.device)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"steps": len(losses), "tokens": len(losses) * cfg.batch_size * 512}


def published_cycle(lm, cfg, tasks, pairs, seed: int) -> dict:
    d = lm.device
    task_list = [t for t in tasks for _ in range(cfg.candidates)]
    (outputs, gen_tokens), gen_s = timed(d, lambda: generate_one_by_one(
        lm, [isi.command_request(t) for t in task_list], PUBLISHED_TOKENS["command"], cfg.temperature, seed))
    commands = [isi.extract_command(text) for text in outputs]
    (inversions, inv_tokens), inv_s = timed(d, lambda: generate_one_by_one(
        lm, [isi.inversion_request(c) for c in commands], PUBLISHED_TOKENS["inversion"], cfg.invert_temperature, seed + 1))
    recons = [isi.extract_reconstruction(t) for t in inversions]
    (ratings, rate_tokens), rate_s = timed(d, lambda: generate_one_by_one(
        lm, [isi.rating_request(t.text, r) for t, r in zip(task_list, recons)], PUBLISHED_TOKENS["rating"], 0, seed + 2))
    scores = [isi.mix_score(t.text, r, isi.parse_rating(x)) for t, r, x in zip(task_list, recons, ratings)]
    accepted = [(t, c) for t, c, s in zip(task_list, commands, scores) if s >= cfg.threshold and c]
    train, train_s = timed(d, lambda: published_train(lm, cfg, pairs, seed + 3))
    return {"generate_s": gen_s, "generate_tokens": gen_tokens, "invert_s": inv_s, "invert_tokens": inv_tokens,
            "score_s": rate_s, "score_tokens": rate_tokens, "train_s": train_s, "train_steps": train["steps"],
            "train_pairs": len(pairs), "accepted": len(accepted), "candidates": len(task_list)}


# ---------------------------------------------------------------------------------------------
# The project's code path
# ---------------------------------------------------------------------------------------------

def project_cycle(lm, embedder, cfg, tasks, seed: int) -> tuple[dict, list]:
    """Also returns the training pairs both patterns train on: every candidate with a command,
    the most a cycle can accept (a model at cycle 0 accepts few, which would time nothing)."""
    d = lm.device
    written, gen_s = timed(d, lambda: isi.generate_commands(lm, cfg, tasks, copies=cfg.candidates, greedy=False,
                                                         seed=seed, label="generate"))
    judged, judge_s = timed(d, lambda: isi.judge_commands(lm, embedder, cfg, written.records, frozen=False,
                                                          greedy=False, seed=seed, label="judge"))
    pairs = [(isi.Task(r["task"], r["tool"]), r["command"]) for r in judged.records if r["command"]]
    train, train_s = timed(d, lambda: isi.train_adapter(lm, cfg, pairs, seed))
    t = judged.timing
    return {"generate_s": gen_s, "generate_tokens": written.timing["generate_tokens"],
            "generate_prefilled": written.timing["generate_prefilled"],
            "invert_s": t["invert_s"], "invert_tokens": t["invert_tokens"], "invert_prefilled": t["invert_prefilled"],
            "score_s": judge_s - t["invert_s"], "score_tokens": t["rating_tokens"], "score_prefilled": t["rating_prefilled"],
            "train_s": train_s, "train_steps": train["steps"], "train_pairs": len(pairs),
            "train_positions": train.get("positions", 0), "train_command_tokens": train.get("command_tokens", 0),
            "accepted": sum(r["accepted"] for r in judged.records), "candidates": len(judged.records)}, pairs


# ---------------------------------------------------------------------------------------------
# Arithmetic: what each stage computed, against this machine's own matrix-product rate
# ---------------------------------------------------------------------------------------------

def model_shape(lm) -> dict:
    """Parameters the decoder layers apply to every position (4-bit weights counted as weights,
    LoRA included), and those of the vocabulary head, applied only where logits are needed."""
    base = lm.model.get_base_model()
    layers = support.model.parameter_count(base.get_decoder().layers.parameters())
    head = base.get_output_embeddings().weight
    return {"layer_params": layers, "head_params": head.shape[0] * head.shape[1], "hidden": base.config.hidden_size,
            "intermediate": base.config.intermediate_size}


def matmul_rate_gflops(device: str, dtype: str, rows: int, shape: dict, packed: bool = False,
                       windows: int = 8) -> tuple[float, float]:
    """torch.nn.functional.linear [rows x hidden] x [hidden x intermediate], the model's largest
    product, in its dtype (or, `packed`, the same product with the weight packed once for oneDNN,
    as the main script's --cpu-matmul packed): the rate this machine reaches at that shape
    (GFLOP/s), the best and the median of `windows` windows of 0.2 s. (One 0.5 s window varied
    from 102 to 169 GFLOP/s at 150 rows between calls on a 2-core AMD EPYC; the best of eight,
    168-180.)"""
    import torch
    kind = getattr(torch, dtype)
    x = torch.randn(rows, shape["hidden"], device=device, dtype=kind)
    w = torch.randn(shape["intermediate"], shape["hidden"], device=device, dtype=kind)
    if packed:
        w = support.cpu_products.pack_weight(w, 150)

    def product():
        return support.cpu_products.packed_linear(x, w) if packed else torch.nn.functional.linear(x, w)
    for _ in range(3):
        product()
    rates = []
    for _ in range(windows):
        reps, seconds = 0, 0.0
        while seconds < 0.2:
            _, elapsed = timed(device, product)
            reps, seconds = reps + 1, seconds + elapsed
        rates.append(2 * rows * shape["hidden"] * shape["intermediate"] * reps / seconds / 1e9)
    return round(max(rates), 1), round(statistics.median(rates), 1)


def stage_arithmetic(figures: dict, shape: dict) -> dict:
    """GFLOP per stage of the project's path: 2 per parameter per position in a forward pass (the
    head only where a token is chosen), 4 in training (forward, and backward to the activations;
    the frozen weights need no gradient). Attention scores, a few per cent here, are left out."""
    def forward(prefilled, generated):
        return 2 * shape["layer_params"] * (prefilled + generated) + 2 * shape["head_params"] * generated
    return {"generate": forward(figures["generate_prefilled"], figures["generate_tokens"]) / 1e9,
            "invert": forward(figures["invert_prefilled"], figures["invert_tokens"]) / 1e9,
            "score": forward(figures["score_prefilled"], figures["score_tokens"]) / 1e9,
            "train": (4 * shape["layer_params"] * figures["train_positions"]
                      + 4 * shape["head_params"] * figures["train_command_tokens"]) / 1e9}


def with_rates(stages: dict) -> dict:
    out = dict(stages)
    for stage in ("generate", "invert", "score"):
        seconds = stages[f"{stage}_s"]
        out[f"{stage}_tokens_per_s"] = round(stages[f"{stage}_tokens"] / seconds, 1) if seconds else None
    out["total_s"] = sum(stages[f"{s}_s"] for s in ("generate", "invert", "score", "train"))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=support.model.EMBEDDED_MODEL, help="as in the main script")
    parser.add_argument("--random-config", choices=["tiny", "mistral-7b"], help="random weights in this shape instead of --model")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quantize", default="auto", choices=["auto", "4bit", "none"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="as in the main script; both patterns run in it")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5, help="0 makes a random model train on everything")
    parser.add_argument("--skip-published", action="store_true", help="time only the project's path")
    parser.add_argument("--max-command-tokens", type=int, default=48, help="as in the main script")
    parser.add_argument("--max-inversion-tokens", type=int, default=40, help="as in the main script")
    parser.add_argument("--gen-batch-size", type=int, default=isi.Config().gen_batch_size, help="as in the main script")
    parser.add_argument("--cpu-matmul", default="auto", choices=["auto", "packed", "plain"], help="as in the main script (the project's path)")
    parser.add_argument("--out", default="output/bench_cycle.json", help="where to write the JSON figures")
    args = parser.parse_args(argv)

    scratch, built = tempfile.TemporaryDirectory(), time.perf_counter()
    model = str(random_model_dir(args.random_config, Path(scratch.name))) if args.random_config else args.model
    print(f"model {model}" + (f" (random weights, built in {time.perf_counter() - built:.0f} s)" if args.random_config else ""),
          flush=True)
    # the published scorer (it has the most generation work: the self-rating) and the published settings
    cfg = isi.validate(isi.Config(model=model, device=args.device, quantize=args.quantize, precision=args.precision,
                                  tasks=args.tasks, candidates=args.candidates, seed=args.seed, scorer="mix",
                                  threshold=args.threshold, max_command_tokens=args.max_command_tokens,
                                  max_inversion_tokens=args.max_inversion_tokens, gen_batch_size=args.gen_batch_size,
                                  cpu_matmul=args.cpu_matmul))
    started = time.perf_counter()
    lm = support.model.load_language_model(cfg)
    matmul = support.cpu_products.choose_cpu_matmul(lm, cfg)
    load = {"load_s": round(time.perf_counter() - started, 1), "peak_memory_gib": peak_memory_gib(lm.device),
            "model_tensors_gib": model_memory_gib(lm.model), "anonymous_memory_gib": anonymous_memory_gib()}
    print(support.model.describe_model(lm, cfg) + f"; loaded in {load['load_s']} s; memory: " + ", ".join(
        f"{k} {v}" for k, v in load.items() if k != "load_s"), flush=True)
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), cfg.tasks, random.Random(args.seed))
    initial = {k: v.detach().clone() for k, v in lm.model.state_dict().items() if "lora_" in k}
    generate_one_by_one(lm, ["warm-up"], 2, 0, 0)  # first-call set-up is not part of either pattern
    isi.generate(lm, ["warm-up"], temperature=0, max_new_tokens=2, stop_at_line=False, batch_size=1, seed=0, desc="warm-up")

    results = {"device": lm.device, "device_name": device_name(lm.device), "model": args.random_config or args.model,
               "quantize": cfg.quantize, "dtype": lm.dtype, "matmul": matmul, "tasks": cfg.tasks, "candidates": cfg.candidates, "seed": args.seed,
               "versions": versions(), "published_caps": PUBLISHED_TOKENS, "load": load,
               "caps": {"command": cfg.max_command_tokens, "inversion": cfg.max_inversion_tokens,
                        "gen_batch_size": cfg.gen_batch_size}}
    shared = {}

    def project():
        figures, shared["pairs"] = project_cycle(lm, None, cfg, tasks, args.seed)
        return figures

    paths = [("project", project)]
    if not args.skip_published:
        paths.append(("published", lambda: published_cycle(lm, cfg, tasks, shared["pairs"], args.seed)))
    for name, run_path in paths:
        lm.model.load_state_dict(initial, strict=False)  # both paths start from the same adapter
        support.cpu_products.set_packed_products(lm.model, name == "project" and matmul == "packed")  # the published one: torch's own
        reset_peak(lm.device)
        figures = with_rates(run_path())
        figures["peak_memory_gib"] = peak_memory_gib(lm.device)
        figures["anonymous_memory_gib_after"] = anonymous_memory_gib()
        results[name] = figures
        print(f"{name:>9}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    shape, rows = model_shape(lm), min(cfg.gen_batch_size, cfg.tasks * cfg.candidates)
    train_rows = max(1, results["project"]["train_positions"] // max(1, results["project"]["train_steps"]))
    products = ["plain", "packed"] if support.cpu_products.can_pack(lm) else ["plain"]
    by_product = {product: {f"rows_{m}": matmul_rate_gflops(lm.device, lm.dtype, m, shape, packed=product == "packed")
                            for m in sorted({rows, train_rows, 8, 1}, reverse=True)} for product in products}
    # the reference is the faster product at each shape: what this machine can do there
    rates = {k: max((by_product[p][k] for p in products), key=lambda rate: rate[0]) for k in by_product["plain"]}
    results["machine_gflops"] = {k: best for k, (best, _) in rates.items()}
    results["machine_gflops_median"] = {k: median for k, (_, median) in rates.items()}
    results["machine_gflops_by_product"] = {p: {k: best for k, (best, _) in r.items()} for p, r in by_product.items()}
    results["arithmetic"] = {}
    for stage, gflop in stage_arithmetic(results["project"], shape).items():
        seconds = results["project"][f"{stage}_s"]
        reference = results["machine_gflops"][f"rows_{train_rows if stage == 'train' else rows}"]
        rate = gflop / seconds if seconds else 0.0
        results["arithmetic"][stage] = {"gflop": round(gflop, 1), "gflops": round(rate, 1),
                                        "share_of_machine_rate": round(rate / reference, 3) if reference else None}
    for product, r in by_product.items():
        print(f"machine: linear [m x {shape['hidden']}] x [{shape['hidden']} x {shape['intermediate']}] in {lm.dtype}, "
              f"{product}: " + ", ".join(f"{k.removeprefix('rows_')} rows {best} GFLOP/s (median {median})"
                                         for k, (best, median) in r.items()))
    for stage, a in results["arithmetic"].items():
        print(f"  {stage:>8}: {a['gflop']} GFLOP at {a['gflops']} GFLOP/s = {100 * (a['share_of_machine_rate'] or 0):.0f}% "
              f"of the machine's best rate at {train_rows if stage == 'train' else rows} rows", flush=True)
    if "published" in results:
        results["speedup"] = {s: round(results["published"][f"{s}_s"] / results["project"][f"{s}_s"], 1)
                              for s in ("generate", "invert", "score", "train", "total")
                              if results["project"][f"{s}_s"] > 0}
        print("speedup (published / project): " + json.dumps(results["speedup"]), flush=True)
    write_figures(args.out, results)
    return 0


def write_figures(out: str, results: dict) -> None:
    """A bench's figures as JSON at --out (its folder made)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def device_name(device: str) -> str:
    import torch
    return torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"


def versions() -> dict:
    import peft
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
