"""Intrinsic self-improvement by inversion: a language model improves at writing shell commands
with no human labels and no external reward model.

Each cycle the model writes candidate commands for natural-language tasks (GENERATE), rewrites
each command back into a task (INVERT), scores how close the reconstruction is to the original
(SCORE), and trains a LoRA adapter on the candidates that clear a threshold (SELECT, TRAIN).
A fixed probe set, scored with greedy decoding after every cycle, gives a like-for-like curve.

    # embedded SmolLM2-135M-Instruct, offline, on the CPU (2 cores: 9 to 52 min by CPU kind, README.md)
    python intrinsic_self_improvement.py --cycles 10

    # the published experiment: Mistral-7B-Instruct-v0.2, 4-bit QLoRA on one GPU
    python intrinsic_self_improvement.py --model mistralai/Mistral-7B-Instruct-v0.2 --cycles 10

    # continue a run from its last checkpoint, up to 20 cycles
    python intrinsic_self_improvement.py --resume --cycles 20

    # runs side by side: a table and one plot
    python intrinsic_self_improvement.py compare output/extended_run/*

    # which label-free signal picks the commands that work? every signal against execution
    # truth on NL2Bash, with intervals, before any training (docs/audit.md); and one of your own,
    # a function in a file, audited and then used by SELECT (docs/signals.md)
    python intrinsic_self_improvement.py audit --candidates 4 --signal examples/short_and_passing.py:short_and_passing
    python intrinsic_self_improvement.py --domain bash --signal examples/short_and_passing.py:short_and_passing

    # one run across 4 GPUs (or: accelerate launch --multi_gpu --num_processes 4 intrinsic_...)
    torchrun --nproc_per_node 4 -- intrinsic_self_improvement.py \
        --model mistralai/Mistral-7B-Instruct-v0.2

This file is the algorithm, in the order it runs: the tasks, GENERATE, INVERT, SCORE, the
likelihood, EXECUTE, the signal table, SELECT, TRAIN, the outside evaluation, the cycle loop. The
machinery (model loading, the decoder, the CPU's products, processes, the run directory, reports,
the sandbox, signals from files) is in support/, and so is the audit, a program of its own over
these stages (support/audit_program.py). The intrinsic score measures agreement of the model
with itself; it is not a measure of correctness. See README.md for what it does and does not
show.
"""
import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from collections.abc import Callable

from support import UsageError, nl2bash
from support.bash_structure import command_structure
from support.cli import (HUB_ID, Invocation, OneLineParser, Terminated, add_config_flags, check_model_source,
                         compare, eval_groups, stopped, terminated)
from support.decoder import answer_logprobs, decode, one_each, per_row
from support.health import collapse_reasons, generation_health, words
from support.model import EMBEDDED_EMBEDDER, EMBEDDED_MODEL, LanguageModel, compute_record, load_models
from support.plugins import checked_values, load_function
from support.reports import (log_cycle_end, log_done, log_evaluation, log_stage, log_training, record_cycle,
                             score_correlations, tools_line, write_results)
from support.run_directory import (check_run_directory, hold_run_directory, load_checkpoint, prepare_run_directory,
                                   resumed_history, save_checkpoint, write_jsonl)
from support.sandbox import Sandbox, SandboxUnavailable
from support import shellcheck
from support.domain_eval import held_out_items, held_out_texts
from support.tasks import (SLOT_PATTERN, TABLE_FORMATS, environment_script, gold_command, has_golds, load_domain,
                           template_slots)
from support.team import PeerFailed, Team, join_team, leave_team, team_from_environment
from support.tools import ToolChecker, summarize_tools
from support.tracking import REPORTERS, check_reporter, open_reporter, report_cycle

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def setting(default, help: str, choices: list | None = None):
    """A Config field: its default, its --help text and, for a fixed set, its choices."""
    return field(default=default,
                 metadata={"help": help} | ({"choices": choices} if choices else {}))


@dataclass
class Config:
    """Everything that defines a run. The CLI is generated from these fields, one flag each."""
    cycles: int = setting(10, "total cycles; with --resume, the cycle to run up to")
    tasks: int = setting(50, "tasks drawn per cycle")
    candidates: int = setting(3, "candidate commands per task")
    threshold: float = setting(0.5, "a candidate is accepted when its score is >= this, in [0, 1]")
    temperature: float = setting(0.7, "sampling temperature for candidate commands")
    invert_temperature: float = setting(0.3, "sampling temperature for reconstructing the task")
    model: str = setting(EMBEDDED_MODEL,
                         "'embedded' (SmolLM2-135M-Instruct, offline) or a hub id or local path")
    output: str = setting("./output/extended_run", "parent folder of run directories")
    name: str | None = setting(
        None, "run directory name; None means model_domain_seedN (never the cycle count)")
    lr: float = setting(2e-4, "LoRA learning rate (linear decay over each cycle's epoch)")
    batch_size: int = setting(4, "training batch size")
    seed: int = setting(0, "seed for task draws, sampling and training")
    resume: bool = setting(False, "continue the run in its directory from its last completed cycle")
    device: str = setting("auto", "where the model runs", ["auto", "cpu", "cuda"])
    precision: str = setting(
        "auto",
        "compute dtype: auto is bf16 on GPUs that have it (else fp16); on the CPU, bf16 where its "
        "products are measured at least 10%% faster than fp32's on this machine (once, kept in the cache "
        "folder), fp32 elsewhere", ["auto", "fp32", "bf16", "fp16"])
    quantize: str = setting(
        "auto", "4bit: QLoRA, NF4 weights with double quantisation (bitsandbytes; on the CPU too); "
        "auto: 4bit on CUDA, none on the CPU", ["auto", "4bit", "none"])
    scorer: str = setting(
        "embed", "embed: MiniLM cosine; mix: published word/difflib/self-rating mix; lexical: mix "
        "without the rating", ["embed", "mix", "lexical"])
    domain: str = setting(
        "pentest",
        "built-in task domain (support/domains/): pentest (published) or bash (files and "
        "text)", ["pentest", "bash"])
    tasks_file: str | None = setting(
        None,
        "your own tasks, replacing --domain: a JSON domain of templates, a table of plain tasks "
        "(.jsonl, .csv, .parquet with a 'task' and an optional 'tool' column), or a hub dataset id "
        "(format in docs/tasks.md)")
    score_all: bool = setting(
        False, "give every candidate every signal's value in examples_cycle_N.jsonl, to re-analyse "
        "a run under another signal: adds the likelihood (about as long as generating and "
        "inverting); inversion, execution and ladder values are always there")
    stop_on_collapse: bool = setting(
        False, "stop after a cycle whose fresh batch has collapsed by its label-free health "
        "(COLLAPSE: restated tasks, no commands, repeated n-grams); resumable")
    probe_tasks: int = setting(
        20, "fixed probe tasks, drawn once, never trained on, scored greedily every cycle")
    signal: str = setting(
        "inversion", "what SELECT keeps: one of the signals listed below --help's flags, a combination "
        "A+B of them (what both keep, or of A's per task the one B ranks first), or a signal of your "
        "own, path/to/file.py:NAME, alone or as ladder+path/to/file.py:NAME (docs/signals.md)")
    train_from: str = setting(
        "previous", "previous: continue the adapter each cycle (published); base: a fresh adapter "
        "each cycle, trained on everything selected so far (ReST-EM)", ["previous", "base"])
    select: str = setting(
        "threshold", "threshold: train on the candidates --signal keeps (published); all: on every "
        "candidate; random: on a random subset of the size the signal would keep; oracle: on the "
        "candidates whose execution matches their task's gold command (uses labels: the ceiling of any "
        "selection; needs a domain with golds, as bash); oracle-sized: on as many as the signal would keep, "
        "those whose runs come closest to their gold's (uses labels: random's twin)",
        ["threshold", "all", "random", "oracle", "oracle-sized"])
    data: str = setting(
        "cycle",
        "cycle: train on this cycle's selection (published); cumulative: on every selection "
        "so far (--train-from base always is)", ["cycle", "cumulative"])
    judge: str = setting(
        "self", "self: the trained model inverts and rates (published); frozen: the base model, "
        "adapter disabled", ["self", "frozen"])
    task_source: str = setting(
        "templates",
        "templates: tasks from the domain's templates; model: the model writes its own "
        "tasks, few-shot from them", ["templates", "model"])
    eval: str = setting(
        "auto",
        "external evaluation, comma-separated: nl2bash runs the model's commands for InterCode's NL2Bash "
        "in a sandbox; domain: for the task domain's held-out tasks (about 150, never trained on), "
        "against their gold commands (needs a domain with golds, as bash); tools: the domain's real "
        "tools (pentest's nmap, hydra, ...) run the probe's and the fresh batch's commands in the sandbox "
        "and their own parsers accept or reject them (needs a domain that names its tools); auto: tools "
        "where the domain names tools and the sandbox runs, else none; none")
    eval_every: int = setting(
        1, "evaluate before cycle 1, every this many cycles, and after the last; 0: after the last "
        "cycle only (the untrained model's figures are the same for every seed and signal)")
    eval_limit: int = setting(
        0, "evaluate on this many NL2Bash items (a fixed subset); 0 means all 300")
    eval_fs: str = setting(
        "1,2,3,4,5",
        "NL2Bash file systems to evaluate on, comma-separated (items of the others are "
        "left out)")
    eval_workers: int = setting(
        0,
        "commands run in parallel sandboxes (evaluation and --signal execution); 0 means one per "
        "CPU core")
    embedder: str = setting(
        EMBEDDED_EMBEDDER, "sentence-transformers model for --scorer embed: 'embedded' or a path")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    max_command_tokens: int = setting(
        48, "cap on new tokens for a command (generation also stops at its first line)")
    max_inversion_tokens: int = setting(40, "cap on new tokens for a reconstructed task")
    gen_batch_size: int = setting(
        176, "sequences per batch in generation (a prompt's candidates share one prefill; the default "
        "holds the published 50 x 3 and the 20 probe tasks); out of GPU memory, a run halves it and "
        "goes on")
    cpu_matmul: str = setting(
        "auto",
        "the CPU's products with the frozen weights: packed: the weights reordered once for "
        "oneDNN (two more copies in memory); plain: PyTorch's own; auto: packed where it is faster on "
        "this machine (measured once, kept in the cache folder) and what it adds, about five times "
        "the weights, fits in a quarter of its memory", ["auto", "packed", "plain"])
    report_to: str = setting(
        "none", "also write each cycle's figures, the training loss per step, the configuration and a "
        "sample of commands where runs are watched: tensorboard (event files in the run directory), "
        "wandb (offline unless WANDB_MODE says otherwise; needs the wandb package)", REPORTERS)


# may differ between a run and its resume
RUN_ONLY_FIELDS = {"cycles", "resume", "output", "name", "eval_workers", "cpu_matmul", "stop_on_collapse",
                   "score_all", "report_to"}
# what a run made before a setting existed ran with: its default
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="intrinsic_self_improvement.py", description=__doc__.split("\n\n")[0],
        epilog="Subcommands: 'intrinsic_self_improvement.py compare RUN_DIR [RUN_DIR ...]' puts runs "
        "side by side, a table and one plot (see 'compare --help'); 'intrinsic_self_improvement.py "
        "audit' scores every label-free signal against execution truth on NL2Bash (see 'audit --help'). "
        "Signals (--signal): " + "; ".join(f"{s.name}: {s.help}" for s in SIGNALS.values() if s.loop)
        + "; inversion+execution: both; ladder+likelihood, ladder+inversion: of the ladder's candidates "
        "per task, the one the second ranks first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    add_config_flags(parser, Config, [f.name for f in dataclasses.fields(Config)])
    return parser


EVALUATIONS = ("nl2bash", "domain", "tools")


def asked_evaluations(value: str) -> frozenset | None:
    """--eval as the evaluations it asks for; None for auto (decided by the domain and the machine)."""
    if value == "auto":
        return None
    parts = [] if value == "none" else value.split(",")
    if any(p not in EVALUATIONS for p in parts) or len(set(parts)) < len(parts):
        raise UsageError(f"--eval: none, auto, or some of {', '.join(EVALUATIONS)} comma-separated, got {value!r}")
    return frozenset(parts)


def validate(cfg: Config) -> Config:
    """Reject settings that cannot make a run, before anything heavy happens."""
    for name in ("cycles", "tasks", "candidates", "batch_size", "lora_r", "lora_alpha",
                 "max_command_tokens", "max_inversion_tokens", "gen_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_every < 0:
        raise UsageError(
            f"--eval-every must be zero (the last cycle only) or positive, got {cfg.eval_every}")
    if cfg.eval_workers < 0:
        raise UsageError(
            f"--eval-workers must be zero (one per core) or positive, got {cfg.eval_workers}")
    eval_groups(cfg)
    asked_evaluations(cfg.eval)
    resolve_signal(cfg.signal)
    check_reporter(cfg.report_to)
    if cfg.eval_limit < 0:
        raise UsageError(f"--eval-limit must be zero (all items) or positive, got {cfg.eval_limit}")
    if cfg.probe_tasks < 0:
        raise UsageError(f"--probe-tasks must be zero or positive, got {cfg.probe_tasks}")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {cfg.threshold}")
    for name in ("temperature", "invert_temperature", "lr"):
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.tasks_file is not None and not Path(cfg.tasks_file).is_file() and (
            Path(cfg.tasks_file).suffix in {".json", *TABLE_FORMATS} or
            not HUB_ID.fullmatch(cfg.tasks_file)):
        raise UsageError(f"--tasks-file: no such file: {cfg.tasks_file}")
    if cfg.model != EMBEDDED_MODEL:
        check_model_source(cfg.model, "--model")
    if cfg.scorer == "embed" and cfg.embedder != EMBEDDED_EMBEDDER:
        check_model_source(cfg.embedder, "--embedder")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise UsageError("--precision fp16 is for GPUs; use bf16 or fp32 on the CPU")
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name in {".", ".."}):
        raise UsageError(f"--name must be a plain folder name, got {cfg.name!r}")
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    return validate(Config(**vars(args)))


def domain_label(cfg: Config) -> str:
    return Path(cfg.tasks_file).stem if cfg.tasks_file else cfg.domain


def default_run_name(cfg: Config) -> str:
    """Depends on what the experiment is, never on --cycles, so --resume finds the same folder."""
    model = "smollm2-135m" if cfg.model == EMBEDDED_MODEL else Path(cfg.model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}_{domain_label(cfg)}_seed{cfg.seed}")


def experiment_settings(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY_FIELDS}


def stage_seed(seed: int, *parts) -> int:
    """A seed per (run seed, cycle, stage): every stage is reproducible on its own, so a resumed
    run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def run_directory(cfg: Config) -> Path:
    return Path(cfg.output) / (cfg.name or default_run_name(cfg))


# ---------------------------------------------------------------------------------------------
# Tasks and prompts
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    text: str
    tool: str | None = None


def fill_template(template: dict, slots: dict, rng: random.Random) -> Task:
    if template.get("plain"):  # a task from a table: its text as it is, braces included
        return Task(template["task"], template.get("tool"))
    slots_used, slots = sorted(set(SLOT_PATTERN.findall(template["task"]))), template_slots(template, slots)
    values = {slot: rng.choice(slots[slot]) for slot in slots_used}
    return Task(SLOT_PATTERN.sub(lambda m: values[m.group(1)], template["task"]), template.get("tool"))


def draw_tasks(domain: dict, n: int, rng: random.Random, exclude: frozenset = frozenset(),
               distinct: bool = False) -> list[Task]:
    """Draw n tasks: a template uniformly, then each slot uniformly. Tasks in `exclude` (the probe
    set) are never drawn, so nothing the probe measures is ever trained on."""
    tasks, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(tasks) == n:
            return tasks
        task = fill_template(rng.choice(domain["templates"]), domain.get("slots", {}), rng)
        if task.text in exclude or (distinct and task.text in seen):
            continue
        seen.add(task.text)
        tasks.append(task)
    raise UsageError(f"the task domain cannot produce {n} {'distinct ' if distinct else ''}tasks"
                     f"{' outside the probe set' if exclude else ''}; add templates or slot values")


def command_request(task: Task) -> str:
    what = f"the {task.tool} command" if task.tool else "the shell command"
    return f"Task: {task.text}\nWrite only {what} for this task, nothing else."


def inversion_request(command: str) -> str:
    return (f"Command: {command}\n"
            "In one sentence, what task does this command perform? Answer with the task only.")


def rating_request(original: str, reconstruction: str) -> str:
    return (f"Task A: {original}\nTask B: {reconstruction}\n"
            "On a scale from 0 to 10, how similar are these two tasks? Answer with one number.")


def chat_prompt(tokenizer, request: str) -> str:
    """The model's own chat format; a plain prompt for models that have none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{request}\n"


def prompt_ids(tokenizer, request: str) -> list[int]:
    """The tokens a request is answered from: the chat format's text and nothing added on top (a
    template that writes BOS into the text, as Mistral's does, would otherwise get two)."""
    return tokenizer(chat_prompt(tokenizer, request), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Reading model output (pure)
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)


COMMAND_START = re.compile(r"[\w./~+-]+(\s|$)")


def first_content_line(text: str) -> str:
    """The first non-empty line that is not a code fence, stripped; '' when there is none."""
    lines = (ln.strip() for ln in text.split("\n"))
    return next((ln for ln in lines if ln and not ln.startswith("```")), "")


def first_line_complete(text: str) -> bool:
    """True once the text holds a finished content line (first_content_line of the text before
    its last newline): the point at which a command (or a one-sentence task) is complete and
    generation can stop."""
    return bool(first_content_line(text.rpartition("\n")[0]))


def strip_wrapping(text: str) -> str:
    """Remove matching outer quotes or backticks, repeatedly."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "`'\"":
        text = text[1:-1].strip()
    return text


def extract_command(output: str) -> str:
    """The first command line of a model's output: inside a code fence if there is one, without
    a leading '$ ' prompt or wrapping quotes. '' when there is none."""
    fenced = FENCE.search(output)
    body = fenced.group(1) if fenced else output
    line = strip_wrapping(first_content_line(body))
    if line.startswith("$ "):
        line = line[2:]
    return strip_wrapping(line)


def is_usable_command(command: str) -> bool:
    """A command line starts with a program-like word ('nmap', './run.sh'); prose ('Sure, ...',
    "I'm ...") and labels ('Task: ...') do not."""
    return bool(command) and bool(COMMAND_START.match(command))


def extract_reconstruction(output: str) -> str:
    line = re.sub(r"^(task|answer)\s*:\s*", "", first_content_line(output), flags=re.I)
    return strip_wrapping(line)


def parse_rating(output: str) -> int | None:
    """The first whole number 0..10 in the output, or None (a parse failure, counted)."""
    match = re.search(r"\b(10|[0-9])\b", output)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Similarity scores
# ---------------------------------------------------------------------------------------------

def word_overlap(original: str, reconstruction: str) -> float:
    """Share of the original task's distinct words found in the reconstruction."""
    wanted = set(words(original))
    return len(wanted & set(words(reconstruction))) / len(wanted) if wanted else 0.0


def sequence_ratio(original: str, reconstruction: str) -> float:
    return difflib.SequenceMatcher(None, original.lower(), reconstruction.lower()).ratio()


def lexical_score(original: str, reconstruction: str) -> float:
    """The published mix without the self-rating, renormalised to [0, 1]."""
    return (0.2 * word_overlap(original, reconstruction) +
            0.3 * sequence_ratio(original, reconstruction)) / 0.5


def mix_score(original: str, reconstruction: str, rating: int | None) -> float:
    """The published score: 0.2 word overlap + 0.3 difflib ratio + 0.5 self-rating / 10. A rating
    that could not be parsed counts as 0 (and is counted as a failure by the caller)."""
    return (0.2 * word_overlap(original, reconstruction) +
            0.3 * sequence_ratio(original, reconstruction) + 0.5 * (rating or 0) / 10)


def embedding_scores(embedder, originals: list[str], reconstructions: list[str]) -> list[float]:
    """Cosine similarity of normalised embeddings, clipped at 0 so scores lie in [0, 1]."""
    if not originals:
        return []
    vectors = embedder.encode(originals + reconstructions, batch_size=64, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    n = len(originals)
    cosines = (vectors[:n] * vectors[n:]).sum(axis=1)
    return [float(min(1.0, max(0.0, c))) for c in cosines]


# ---------------------------------------------------------------------------------------------
# Tasks written by the model (--task-source model)
# ---------------------------------------------------------------------------------------------

def template_patterns(domain: dict) -> list[re.Pattern]:
    """One regex per template, slots as wildcards: recognises any task the templates can make."""
    patterns = []
    for template in domain["templates"]:
        # literal, slot, literal, ...
        parts = [template["task"]] if template.get("plain") else SLOT_PATTERN.split(template["task"])
        regex = "".join(re.escape(part) if k % 2 == 0 else ".+" for k, part in enumerate(parts))
        patterns.append(re.compile(regex + r"\.?", re.I))
    return patterns


def task_writing_request(tool: str | None, examples: list[str]) -> str:
    shown = "\n".join(f"- {e}" for e in examples)
    return (f"Here are examples of tasks for {tool or 'the shell'}:\n{shown}\n"
            "Write one new task of the same kind, different from these. Answer with the task only.")


def write_tasks(lm: LanguageModel, cfg: Config, domain: dict, n: int, rng: random.Random, seed: int,
                exclude: frozenset) -> tuple[list[Task], dict]:
    """--task-source model: the model writes its own tasks, few-shot from the domain's templates.
    A written task is kept if it has 3 to 40 words, is new, is no probe task, and matches no
    template, so no human-written task enters training. Returns at most n tasks."""
    start = time.perf_counter()
    patterns, slots = template_patterns(domain), domain.get("slots", {})
    by_tool = {}
    for template in domain["templates"]:
        by_tool.setdefault(template.get("tool"), []).append(template)
    tools = sorted(by_tool, key=str)
    kept, seen, requested = [], {t.lower() for t in exclude}, 0
    for attempt in range(3):
        request_tools = [rng.choice(tools) for _ in range(2 * (n - len(kept)))]
        requests = [
            task_writing_request(
                tool, [fill_template(rng.choice(by_tool[tool]), slots, rng).text for _ in range(3)])
            for tool in request_tools
        ]
        written = generate(lm, requests, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_inversion_tokens, stop_at_line=True,
                           batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "write", attempt),
                           desc="write tasks")
        requested += len(requests)
        for text, tool in zip(written.texts, request_tools):
            task = extract_reconstruction(text).lstrip("-*• ").strip()
            if len(kept) == n or not 3 <= len(task.split()) <= 40 or task.lower() in seen \
                    or any(p.fullmatch(task) for p in patterns):
                continue
            seen.add(task.lower())
            kept.append(Task(task, tool))
        if len(kept) == n:
            break
    return kept, {"tasks_requested": requested, "tasks_kept": len(kept),
                  "write_tasks_s": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------------
# The stages: GENERATE, INVERT, SCORE
# ---------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """Records of one stage over a list of tasks (one per candidate, a task's adjacent), and
    what it took."""
    records: list[dict]
    timing: dict


def generate(lm: LanguageModel, requests: list[str], *, copies: int | list[int] = 1,
             temperature: float | list[float], max_new_tokens: int, stop_at_line: bool,
             batch_size: int, seed: int, desc: str, with_logprobs: bool = False):
    """The model's answers to requests in its own chat format, `copies` each (temperature 0:
    greedy; both one for all requests or one each), stopped at their first complete line when
    `stop_at_line`. Each process of a team decodes its share with a random stream of its own."""
    if lm.team.size > 1:
        seed = stage_seed(seed, "process", lm.team.rank)
    return decode(lm, [prompt_ids(lm.tokenizer, r) for r in requests], copies=copies,
                  temperature=temperature, max_new_tokens=max_new_tokens,
                  line_done=first_line_complete if stop_at_line else None, batch_size=batch_size,
                  seed=seed, desc=desc, with_logprobs=with_logprobs)


def generate_commands(lm: LanguageModel, cfg: Config, tasks: list[Task], *, copies: int | list[int],
                      greedy: bool | list[bool], seed: int, label: str, certainty: bool = False) -> Stage:
    """GENERATE: `copies` commands per task (adjacent in the records), sampled or `greedy` (both
    one for all tasks or one per task: greedy tasks ride in the sampled batches, which draw as
    they would alone). `certainty`: each record also gets its output's mean token
    log-probability as sampled (a self-certainty signal)."""
    copies, greedy = one_each(copies, len(tasks)), one_each(greedy, len(tasks))
    gen = generate(lm, [command_request(t) for t in tasks], copies=copies,
                   temperature=[0 if g else cfg.temperature for g in greedy],
                   max_new_tokens=cfg.max_command_tokens, stop_at_line=True,
                   batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "generate"),
                   desc=f"{label}: generate", with_logprobs=certainty)
    records = []
    for i, (task, text) in enumerate(zip(per_row(tasks, copies), gen.texts)):
        command = extract_command(text)
        records.append({"task": task.text, "tool": task.tool, "output": text, "command": command,
                        "usable": is_usable_command(command)}
                       | ({"certainty": gen.mean_logprobs[i]} if certainty else {}))
    return Stage(records, {"generate_s": round(gen.seconds, 3), "generate_tokens": gen.tokens,
                           "generate_prefilled": gen.prefilled})


def invert_commands(lm: LanguageModel, cfg: Config, records: list[dict], *, greedy: bool | list[bool],
                    seed: int, label: str) -> Stage:
    """INVERT: the model reconstructs each usable command's task ('' for the others), sampled or
    `greedy` (one for all records or one each)."""
    usable = [i for i, r in enumerate(records) if r["usable"]]
    requests = [inversion_request(records[i]["command"]) for i in usable]
    greedy = one_each(greedy, len(records))
    inv = generate(lm, requests, temperature=[0 if greedy[i] else cfg.invert_temperature for i in usable],
                   max_new_tokens=cfg.max_inversion_tokens, stop_at_line=True,
                   batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "invert"),
                   desc=f"{label}: invert")
    reconstructions = [""] * len(records)
    for i, text in zip(usable, inv.texts):
        reconstructions[i] = extract_reconstruction(text)
    timing = {"invert_s": round(inv.seconds, 3), "invert_tokens": inv.tokens,
              "invert_prefilled": inv.prefilled}
    return Stage([r | {"reconstruction": text} for r, text in zip(records, reconstructions)], timing)


def score_reconstructions(lm: LanguageModel, embedder, cfg: Config, records: list[dict], *,
                          seed: int, label: str) -> Stage:
    """SCORE: the similarity of each task and its reconstruction by --scorer (the mix scorer's
    self-rating by the model); accepted at or above --threshold. No reconstruction scores 0."""
    scored = [i for i, r in enumerate(records) if r["usable"] and r["reconstruction"]]
    originals = [records[i]["task"] for i in scored]
    reconstructions = [records[i]["reconstruction"] for i in scored]
    start = time.perf_counter()
    ratings, rating_tokens, rated_prefilled = [None] * len(records), 0, 0
    if cfg.scorer == "embed":
        values = lm.team.spread(lambda o, r: embedding_scores(embedder, o, r), originals,
                                reconstructions)
    elif cfg.scorer == "lexical":
        values = [lexical_score(o, r) for o, r in zip(originals, reconstructions)]
    else:
        requests = [rating_request(o, r) for o, r in zip(originals, reconstructions)]
        rated = generate(lm, requests, temperature=0,
                         max_new_tokens=5, stop_at_line=True, batch_size=cfg.gen_batch_size,
                         seed=stage_seed(seed, "rate"), desc=f"{label}: rate")
        rating_tokens, rated_prefilled = rated.tokens, rated.prefilled
        for i, text in zip(scored, rated.texts):
            ratings[i] = parse_rating(text)
        values = [mix_score(o, r, ratings[i]) for o, r, i in zip(originals, reconstructions, scored)]
    score_seconds = time.perf_counter() - start
    scores = [0.0] * len(records)
    for i, value in zip(scored, values):
        scores[i] = value
    judged = []
    for i, record in enumerate(records):
        score = round(scores[i], 6)  # accepted as recorded, so the score read back selects the same
        extra = {"score": score, "accepted": score >= cfg.threshold}
        if cfg.scorer == "mix":
            extra["rating"] = ratings[i]
        judged.append(record | extra)
    return Stage(judged, {"score_s": round(score_seconds, 3), "rating_tokens": rating_tokens,
                          "rating_prefilled": rated_prefilled})


def judge_commands(lm: LanguageModel, embedder, cfg: Config, records: list[dict], *, frozen: bool,
                   greedy: bool | list[bool], seed: int, label: str) -> Stage:
    """INVERT and SCORE by one judge. With `frozen`, the base model (adapter disabled)
    reconstructs and rates, so the judge cannot drift with the model it judges."""
    with lm.model.disable_adapter() if frozen else contextlib.nullcontext():
        inverted = invert_commands(lm, cfg, records, greedy=greedy, seed=seed, label=label)
        scored = score_reconstructions(lm, embedder, cfg, inverted.records, seed=seed, label=label)
    return Stage(scored.records, inverted.timing | scored.timing)


def run_stage(lm: LanguageModel, embedder, cfg: Config, tasks: list[Task], *, copies: int | list[int],
              greedy: bool | list[bool], seed: int, label: str, certainty: bool = False) -> Stage:
    """GENERATE, INVERT, SCORE over a batch of tasks, with the run's judge (`copies` and
    `greedy`: one for all tasks or one per task, all decoded in the same passes)."""
    written = generate_commands(lm, cfg, tasks, copies=copies, greedy=greedy, seed=seed,
                                label=label, certainty=certainty)
    judged = judge_commands(lm, embedder, cfg, written.records, frozen=cfg.judge == "frozen",
                            greedy=per_row(one_each(greedy, len(tasks)), one_each(copies, len(tasks))),
                            seed=seed, label=label)
    return Stage(judged.records, written.timing | judged.timing)


def summarize(records: list[dict], scorer: str, plugins: tuple = ()) -> dict:
    """The published per-batch figures, plus what the published script hid (and the mean of each
    signal of one's own in `plugins` that the records hold)."""
    n = len(records)
    accepted = sum(r["accepted"] for r in records)
    summary = {"total_generated": n, "accepted": accepted,
               "acceptance_rate": round(accepted / n, 4) if n else 0.0,
               "mean_score": round(sum(r["score"] for r in records) / n, 4) if n else 0.0,
               "unusable_commands": sum(not r["usable"] for r in records)}
    if records and "passed" in records[0]:  # the commands ran in the domain's file system
        summary["execution_pass_rate"] = round(sum(r["passed"] for r in records) / n, 4)
        summary["agreement_rate"] = round(sum(r["agreed"] for r in records) / n, 4)
        summary["mean_ladder"] = round(sum(r["ladder"] for r in records) / n, 4)
    if records and "tool_verdict" in records[0]:  # the domain's tools judged the commands
        summary |= summarize_tools(records)
    if records and all("likelihood" in r for r in records):
        summary["mean_likelihood"] = round(sum(r["likelihood"] for r in records) / n, 4)
    if scorer == "mix":
        summary["rating_parse_failures"] = sum(
            r["usable"] and bool(r["reconstruction"]) and r["rating"] is None for r in records)
    for plugin in plugins:
        if records and plugin.name in records[0]:
            values = [v for v in map(plugin.value, records) if v is not None]
            summary[plugin.summary] = round(sum(values) / len(values), 4) if values else None
    return summary | {"health": generation_health(records)}


# ---------------------------------------------------------------------------------------------
# LIKELIHOOD: how probable the model finds a given answer (Coder-Reviewer's coder and reviewer)
# ---------------------------------------------------------------------------------------------

def reviewer_example(tokenizer, task: str, command: str) -> dict:
    """The loop's inversion prompt for the command, then the task as its answer, then EOS."""
    return training_example(
        prompt_ids(tokenizer, inversion_request(command)),
        tokenizer(task, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def coder_reviewer(lm: LanguageModel, cfg: Config, tasks: list[Task], commands: list[str], *,
                   frozen_reviewer: bool) -> tuple[list[float], list[float], float, float]:
    """Coder-Reviewer's two mean token log-probabilities per (task, command): the coder's, of the
    command given the task, by the model as it is; the reviewer's, of the task given the command
    (the inversion prompt), by the base model when `frozen_reviewer` (adapter disabled), else by
    the model as it is. And the seconds each took."""
    started = time.perf_counter()
    coder = answer_logprobs(lm, [command_example(lm.tokenizer, t, c) for t, c in zip(tasks, commands)],
                            cfg.gen_batch_size)
    coder_s = time.perf_counter() - started
    with lm.model.disable_adapter() if frozen_reviewer else contextlib.nullcontext():
        reviewer = answer_logprobs(lm, [reviewer_example(lm.tokenizer, t.text, c) for t, c in zip(tasks, commands)],
                                   cfg.gen_batch_size)
    return coder, reviewer, coder_s, time.perf_counter() - started - coder_s


def likelihood_fields(coder: float | None, reviewer: float | None) -> dict:
    """A candidate's likelihood from Coder-Reviewer's two mean token log-probabilities (None: no
    command): both, rounded, and 'likelihood' = exp of their mean, the geometric mean of the two
    per-token probabilities, in [0, 1] as --threshold is (0 without a command)."""
    if coder is None:
        return {"coder": None, "reviewer": None, "likelihood": 0.0}
    return {"coder": round(coder, 5), "reviewer": round(reviewer, 5),
            "likelihood": float(f"{math.exp((coder + reviewer) / 2):.6g}")}


def likelihood_values(lm: LanguageModel, cfg: Config, records: list[dict],
                      only: list[int] | None = None) -> Stage:
    """LIKELIHOOD: per usable command (of `only`, when given), the coder's and the frozen base
    model's reviewer's mean token log-probabilities and the likelihood (likelihood_fields).
    Records left out by `only` get no value."""
    wanted = range(len(records)) if only is None else only
    usable = [i for i in wanted if records[i]["usable"]]
    coder, reviewer, coder_s, reviewer_s = coder_reviewer(
        lm, cfg, [Task(records[i]["task"], records[i]["tool"]) for i in usable],
        [records[i]["command"] for i in usable], frozen_reviewer=True)
    values = [{} for _ in records]
    for i in wanted:
        values[i] = likelihood_fields(None, None)
    for i, c, r in zip(usable, coder, reviewer):
        values[i] = likelihood_fields(c, r)
    return Stage([record | value for record, value in zip(records, values)],
                 {"likelihood_s": round(coder_s + reviewer_s, 3), "likelihood_scored": len(usable)})


# ---------------------------------------------------------------------------------------------
# EXECUTE: label-free signals from execution in the domain's own file system, in the sandbox
# (execution, agreement, the ladder)
# ---------------------------------------------------------------------------------------------

SYNTAX_ERROR = re.compile(r"syntax error|unexpected EOF|unexpected end of file")
# bash's "command not found", or a path run as a program that does not exist
NOT_FOUND = nl2bash.NOT_FOUND_LINE


USAGE_ERROR = re.compile(
    r"\busage:|invalid option|unrecognized option|illegal option|unknown option|"
    r"option requires an argument|missing operand|missing (?:file )?argument|"
    r"invalid argument|Try '[^']*--help'", re.I)


MISSING_FILE = re.compile(r"No such file or directory|cannot access|cannot stat|cannot open")


def execution_verdict(run) -> str:
    """"passed" when bash accepted the command, the programs it calls exist, it exited 0 within
    the limits, printed no usage error or missing-file message, and did something observable
    (printed output, or changed the file system); otherwise the first reason it did not."""
    output = run.output
    if run.timed_out:
        return "timed out"
    if run.truncated:
        return "output past the cap"
    if SYNTAX_ERROR.search(output):
        return "syntax error"
    if run.exit_code == 127 or NOT_FOUND.search(output):
        return "program not found"
    if USAGE_ERROR.search(output):
        return "usage error"
    if MISSING_FILE.search(output):
        return "missing file"
    if run.exit_code != 0:
        return f"exit status {run.exit_code}"
    if not output.strip() and not run.changes:
        return "no effect"
    return "passed"


def execution_result(run) -> tuple | None:
    """What a passing run did, for grouping: exit status, output, and the file-system change with
    the new contents. None for a run that did not pass, or no run (None)."""
    if run is None or execution_verdict(run) != "passed":
        return None
    return (run.exit_code, run.output, tuple(sorted(run.changes)), tuple(sorted(run.signatures.items())))


def group_sizes(results: list) -> list[int]:
    """Per execution result (None: did not pass), how many of `results` equal it; 0 for None."""
    return [0 if result is None else results.count(result) for result in results]


def agreement_sizes(runs: list) -> list[int]:
    """Per run: the size of its MBR-exec group, the runs with the same passing execution result
    (itself included); 0 for a run that did not pass, or no run (None)."""
    return group_sizes([execution_result(run) for run in runs])


def agreement_group(runs: list) -> list[int]:
    """MBR-exec over one task's candidates: the positions of the largest group of candidates with
    the same passing execution result, when it has at least two; else none. A tie goes to the
    group met first. A run may be None (no command to run)."""
    results = [execution_result(run) for run in runs]
    sizes = group_sizes(results)
    largest = max(sizes, default=0)
    if largest < 2:
        return []
    chosen = results[sizes.index(largest)]
    return [i for i, result in enumerate(results) if result == chosen]


# The execution ladder, bottom to top (execution_ladder judges each level)
LADDER = ("parses", "programs_exist", "shellcheck_clean", "exits_zero", "no_usage_error", "effect")


def execution_ladder(run, parses: bool, shellcheck_clean: bool | None) -> dict:
    """The execution ladder's levels for one command, each judged on its own (None: could not be
    checked): bashlex parses it; the programs it calls exist; shellcheck finds no error in it; it
    exits 0 in time; it prints no usage error; it does something observable (output, or a change
    to the file system)."""
    return {"parses": parses,
            "programs_exist": not (run.exit_code == 127 or bool(NOT_FOUND.search(run.output))),
            "shellcheck_clean": shellcheck_clean,
            "exits_zero": run.exit_code == 0 and not run.timed_out,
            "no_usage_error": not USAGE_ERROR.search(run.output),
            "effect": bool(run.output.strip() or run.changes)}


def ladder_score(levels: dict) -> float:
    """The levels climbed in order (LADDER), up to the first one failed, over the levels
    available (a level that could not be checked is skipped, and not counted)."""
    available = [levels[name] for name in LADDER if levels[name] is not None]
    climbed = next((k for k, passed in enumerate(available) if not passed), len(available))
    return climbed / len(available)


def ladder_floor(shellcheck_available: bool) -> float:
    """The ladder value of a command that climbed to exits_zero: the levels up to it over the
    levels available (shellcheck_clean is left out where shellcheck is missing)."""
    available = len(LADDER) - (0 if shellcheck_available else 1)
    climbed = LADDER.index("exits_zero") + 1 - (0 if shellcheck_available else 1)
    return climbed / available


def static_checks(commands: list[str | None]) -> tuple[list, list, dict]:
    """The ladder's two levels that read a command without running it, for each command (None:
    not a command): bashlex parses it (bounded); shellcheck finds no error (None where it is
    missing or failed). And the seconds each took."""
    present = [i for i, c in enumerate(commands) if c is not None]
    started = time.perf_counter()
    parses = [None] * len(commands)
    for i in present:
        parses[i] = command_structure(commands[i]) is not None
    parsed_s = time.perf_counter() - started
    clean = [None] * len(commands)
    for i, ok in zip(present, shellcheck.error_free([commands[i] for i in present]) or []):
        clean[i] = ok
    return parses, clean, {"parses": parsed_s, "shellcheck_clean": time.perf_counter() - started - parsed_s}


def ladder_values(runs: list, parses: list, clean: list) -> list[dict]:
    """Per run (None: not a command, not run) with its static checks: the execution ladder's
    levels and its value, the share of the available levels climbed in order ('ladder', 0 when
    not run)."""
    values = []
    for run, parsed, ok in zip(runs, parses, clean):
        if run is None:
            values.append({"ladder": 0.0, "ladder_levels": None})
            continue
        levels = execution_ladder(run, parsed, ok)
        values.append({"ladder": round(ladder_score(levels), 4),
                       "ladder_levels": {k: None if v is None else int(v) for k, v in levels.items()}})
    return values


EXECUTION_OUTPUT_KEPT = 300  # characters of output kept per candidate in examples_cycle_N.jsonl


def run_commands(sandbox, records: list[dict], team: Team = Team()) -> tuple[list, float]:
    """Every usable command run in a fresh copy of the domain's file system (in parallel,
    sandbox.workers at a time; several processes each run their share): per record its run, None
    where it is no command. And the seconds it took."""
    usable = [i for i, r in enumerate(records) if r["usable"]]
    start = time.perf_counter()
    done = team.spread(lambda commands: sandbox.run_all(["domain"] * len(commands), commands),
                       [records[i]["command"] for i in usable])
    runs = [None] * len(records)
    for i, run in zip(usable, done):
        runs[i] = run
    return runs, time.perf_counter() - start


def execute_commands(sandbox, records: list[dict], copies: int, team: Team = Team(),
                     golds: list[str] | None = None) -> Stage:
    """EXECUTE: every usable command runs in the domain's file system; each record gets its
    verdict ("passed" or why not), a short record of the run, whether it is in its task's
    agreement group (records come in runs of `copies` per task), and its execution ladder. With
    `golds` (one per task, labels: for the oracle arms only), also gold_reward, the evaluation's
    reward of the run against the gold command's, and gold_match: whether it is 1 (the run did
    what the gold does)."""
    runs, seconds = run_commands(sandbox, records, team)
    agreed = set()
    for first in range(0, len(records), copies):
        agreed.update(first + k for k in agreement_group(runs[first:first + copies]))
    ladders = ladder_values(runs, *static_checks([r["command"] if run else None
                                                  for r, run in zip(records, runs)])[:2])
    executed = []
    for i, (record, run) in enumerate(zip(records, runs)):
        verdict = "unusable" if run is None else execution_verdict(run)
        details = None if run is None else {
            "exit_code": run.exit_code, "changes": len(run.changes), "seconds": run.seconds,
            "output": run.output[:EXECUTION_OUTPUT_KEPT]}
        executed.append(record | {"verdict": verdict, "passed": verdict == "passed",
                                  "agreed": i in agreed, "execution": details} | ladders[i])
    if golds is not None:
        gold_runs = team.spread(lambda share: sandbox.run_all(["domain"] * len(share), share), golds)
        for i, run in enumerate(runs):
            reward = 0.0 if run is None else nl2bash.intercode_reward(gold_runs[i // copies], run)
            executed[i] |= {"gold_reward": round(reward, 4), "gold_match": nl2bash.is_success(reward)}
    return Stage(executed, {"execute_s": round(seconds, 3), "executed": sum(r is not None for r in runs)})


def sandbox_workers(cfg: Config, team: Team = Team()) -> int:
    """Commands run at once in sandboxes (by each process): --eval-workers, 0 meaning one per core
    (the cores shared among the processes on a machine)."""
    return cfg.eval_workers or max(1, (os.cpu_count() or 1) // team.local_size)


def open_sandbox(cfg: Config, domain: dict, team: Team = Team()):
    """The sandbox with the domain's file system built, or None: for a domain without an
    environment, or where bubblewrap cannot run and the signal does not need it (then execution
    results are left out, said in one line)."""
    script = environment_script(domain)
    asking = f"--select {cfg.select}" if uses_golds(cfg) else f"--signal {cfg.signal}"
    needs = uses_golds(cfg) or "execution" in signal_needs(*resolve_signal(cfg.signal))
    if script is None:
        if needs:
            raise UsageError(
                f"{asking} runs commands in the domain's file system, and the "
                f"{domain_label(cfg)} domain has none (bash has one; a --tasks-file domain can "
                f"declare one, see README.md)")
        return None
    try:
        return Sandbox({"domain": (script, None)}, workers=sandbox_workers(cfg, team))
    except SandboxUnavailable as err:
        if needs:
            raise UsageError(f"{asking}: {err}") from None
        print(f"execution off: {err}", flush=True)
        return None


def tools_due(cfg: Config, cycle: int) -> bool:
    """Whether the commands generated at the end of `cycle` (0: by the untrained model) are put to
    the tools: every --eval-every cycles and after the last, as the evaluations are; every cycle
    where the signal is the tools' verdict."""
    if "tools" in signal_needs(*resolve_signal(cfg.signal)):
        return True
    return bool(cfg.eval_every and cycle % cfg.eval_every == 0) or cycle == cfg.cycles


def check_tools(checker, records: list[dict], team: Team = Team()) -> Stage:
    """TOOLS: every command whose program is one of the domain's tools runs in the sandbox (no
    network: its targets are unreachable) and the tool's own output says whether its parser
    accepted the command line; each record gets tool_run, tool_verdict (accepted, rejected, not
    run), tool_output and tool_seconds (support/tools.py)."""
    start = time.perf_counter()
    verdicts = team.spread(checker.check, [r["command"] for r in records])
    return Stage([r | v for r, v in zip(records, verdicts)], {"tools_s": round(time.perf_counter() - start, 3)})


def tools_asked(cfg: Config) -> tuple[bool | None, bool]:
    """Whether --eval asks for the tools' truth (None: auto) and whether --signal needs it."""
    asked = asked_evaluations(cfg.eval)
    return (None if asked is None else "tools" in asked), "tools" in signal_needs(*resolve_signal(cfg.signal))


def check_tools_there(cfg: Config, domain: dict) -> None:
    """--eval tools and --signal tools need a domain that names its tools: else one line, before
    anything loads."""
    asked, needed = tools_asked(cfg)
    if (asked or needed) and not domain.get("tools"):
        raise UsageError(f"{'--signal tools' if needed else '--eval tools'} runs the domain's tools, and the "
                         f"{domain_label(cfg)} domain names none (pentest does; a --tasks-file domain can: "
                         f"\"tools\": [...], docs/tasks.md)")


def open_tool_checker(cfg: Config, domain: dict, team: Team = Team()):
    """The domain's tools in the sandbox, or None where they are not asked for. Asked for (--eval
    tools, --signal tools) and impossible: one error line; by --eval auto: off, with a note. Tools
    not installed here are named once; their commands count as not run."""
    asked, needed = tools_asked(cfg)
    if not (asked or needed or (asked is None and domain.get("tools"))):
        return None
    what = "--signal tools" if needed else "--eval tools"
    try:
        checker = ToolChecker(domain["tools"], workers=sandbox_workers(cfg, team))
    except SandboxUnavailable as err:
        if needed or asked is not None:
            raise UsageError(f"{what}: {err}") from None
        if team.main:
            print(f"note: the tools truth is off (--eval auto): {err}", flush=True)
        return None
    if team.main and checker.missing:
        print(f"note: not installed here, so their commands count as not run: {', '.join(checker.missing)} "
              f"(make install installs the Debian ones)", flush=True)
    return checker


# ---------------------------------------------------------------------------------------------
# Signals: one table, read by SELECT, the probe, Goodhart's mark, --score-all and the audit
# ---------------------------------------------------------------------------------------------

# what a signal can ask to have computed for every candidate before its value is read (a candidate
# always has its task, tool, output and command)
NEEDS = ("reconstruction", "execution", "likelihood", "certainty", "tools")
# per task: threshold: value >= --threshold; passes: value 1 (or true); rank: the candidate ranked
# first (the first on a tie), when any has a value; rank_at_threshold: that one, when its value is
# >= --threshold; ladder: the candidates at the highest value of the task, when it is at least the
# ladder's floor (climbed to 'exits 0'); group: the largest agreement group, of two or more (its
# value: the group's size)
RULES = ("threshold", "passes", "rank", "rank_at_threshold", "ladder", "group")
PER_CANDIDATE_RULES = ("threshold", "passes")


@dataclass(frozen=True)
class Signal:
    """A label-free signal: what it needs computed, how a candidate's value is read from its record,
    and the rule that keeps a task's candidates by their values. `summary`: the key of its mean in
    a batch's figures, its own score (watched by Goodhart's mark when `watched`). For the audit:
    `column` and `column_rule`, its value and rule where they differ; `cost`, the timers its cost
    per candidate sums; `variants`, its columns where it has several (name, timers); `itemfs`,
    also a column on the item's own file system. `loop`: a --signal choice; `audited`: a column of
    the audit; `compute`: a plug-in's function."""
    name: str
    needs: frozenset
    value: Callable
    rule: str
    help: str = ""
    summary: str | None = None
    watched: bool = True
    column: Callable | None = None
    column_rule: str | None = None
    cost: tuple = ()
    variants: tuple = ()
    itemfs: bool = False
    loop: bool = True
    audited: bool = True
    compute: Callable | None = None


def level_value(name: str) -> Callable:
    """A ladder level's value: 1 climbed, 0 failed or not run, None could not be checked."""
    def value(record: dict):
        levels = record["ladder_levels"]
        if levels is None:  # not run: failed every level that can be checked
            return None if name == "shellcheck_clean" and not shellcheck.shellcheck_available() else 0
        return levels[name]
    return value


def usable_likelihood(record: dict) -> float | None:
    return record["likelihood"] if record["usable"] else None


def built_in_signals() -> dict[str, Signal]:
    """Every built-in signal, by name, in the audit's column order."""
    execution, likelihood = frozenset({"execution"}), frozenset({"likelihood"})
    run = ("execution", "parses", "shellcheck_clean")
    signals = [
        Signal("inversion", frozenset({"reconstruction"}), lambda r: r["score"], "threshold",
               "the intrinsic score (--scorer) of the task and the command's reconstruction >= --threshold "
               "(published)", summary="mean_score",
               variants=tuple((f"inversion_{s}", (f"inversion_{s}",)) for s in ("embed", "lexical", "mix"))),
        Signal("certainty", frozenset({"certainty"}), lambda r: r["certainty"], "rank",
               "the mean log-probability of the command's tokens as sampled", cost=("certainty",), loop=False),
        Signal("coder", likelihood, lambda r: r["coder"], "rank",
               "the mean log-probability of the command given the task", cost=("coder",), loop=False),
        Signal("reviewer", likelihood, lambda r: r["reviewer"], "rank",
               "the mean log-probability of the task given the command (the inversion prompt)",
               cost=("reviewer",), loop=False),
        Signal("coder_reviewer", likelihood, lambda r: r["coder_reviewer"], "rank", "coder + reviewer",
               cost=("coder", "reviewer"), loop=False),
        *(Signal(level, execution, level_value(level), "passes", f"the execution ladder's level {level}",
                 cost=(level if level in ("parses", "shellcheck_clean") else "execution",), loop=False)
          for level in LADDER),
        Signal("ladder", execution, lambda r: r["ladder"], "ladder",
               "per task, the candidates on the highest rung of the execution ladder reached, when that rung "
               "is at least 'exits 0'", summary="mean_ladder", cost=run, itemfs=True),
        Signal("execution", execution, lambda r: r["passed"], "passes",
               "the command runs cleanly and does something in the domain's sandboxed file system",
               summary="execution_pass_rate", watched=False, cost=("execution",), itemfs=True),
        Signal("agreement", execution, lambda r: r["agreed"], "passes",
               "the largest group of candidates with the same execution result (MBR-exec)",
               summary="agreement_rate", watched=False, column=lambda r: r["agreement"], column_rule="group",
               cost=("execution",), itemfs=True),
        Signal("tools", frozenset({"tools"}), lambda r: r["tool_verdict"] == "accepted", "passes",
               "the domain's real tool (nmap, hydra, ...) accepts the command line: run in the sandbox, its own "
               "parser neither rejects it nor prints its usage (--eval tools' truth; pentest)",
               summary="tools_accepted_rate", watched=False, audited=False),
        Signal("likelihood", likelihood, usable_likelihood, "rank_at_threshold",
               "per task, the candidate with the highest coder-reviewer likelihood, when it is >= --threshold "
               "(a per-token probability)", summary="mean_likelihood", audited=False),
    ]
    return {s.name: s for s in signals}


SIGNALS = built_in_signals()
COMBINATIONS = ("inversion+execution", "ladder+likelihood", "ladder+inversion")
LOOP_SIGNALS = [s.name for s in SIGNALS.values() if s.loop] + list(COMBINATIONS)
# fields of a candidate's record: a plug-in's value is recorded under its name, which must be none of these
RECORD_FIELDS = frozenset({
    "task", "tool", "output", "command", "usable", "reconstruction", "score", "accepted", "rating", "verdict",
    "passed", "agreed", "agreement", "execution", "ladder", "ladder_levels", "coder", "reviewer", "likelihood",
    "coder_reviewer", "certainty", "stage", "selected", "frozen_reconstruction", "frozen_score", "id", "difficulty",
    "gold_match", "gold_reward"})


def load_plugin(spec: str, flag: str = "--signal") -> Signal:
    """A signal written in a file of one's own, `path/to/file.py:NAME` (support/plugins.py loads and
    checks it): its value is recorded on every candidate under its name."""
    name, function, needs, rule = load_function(
        spec, flag, needs=NEEDS, rules=RULES, default_rule="rank",
        taken=lambda n: n in RECORD_FIELDS or n in SIGNALS or n.endswith("_itemfs") or n.startswith("inversion_"),
        choices=f"choose from {', '.join(LOOP_SIGNALS)}, or give a signal from a file as path/to/file.py:NAME")
    return Signal(name, needs, lambda r: r.get(name), rule, f"your signal {spec}", summary=f"mean_{name}",
                  cost=(name,), compute=function)


@functools.cache
def resolve_signal(spec: str) -> tuple[Signal, Signal | None]:
    """A --signal value: a signal (built-in, or path/to/file.py:NAME), or a combination 'A+B' of a
    built-in A and a built-in or a file's B, as (A, B), B None for a single signal."""
    head, plus, tail = spec.partition("+")
    parts = [head, tail] if plus and head in SIGNALS else [spec]
    signals = [SIGNALS[p] if p in SIGNALS else load_plugin(p) for p in parts]
    for part, chosen in zip(parts, signals):
        if not chosen.loop:
            raise UsageError(f"--signal {spec}: {part} is audited, not selected by; choose from "
                             f"{', '.join(LOOP_SIGNALS)} or path/to/file.py:NAME")
    return signals[0], signals[1] if plus and head in SIGNALS else None


def signal_needs(first: Signal, second: Signal | None) -> frozenset:
    return first.needs | (second.needs if second else frozenset())


def plugins_of(first: Signal, second: Signal | None) -> tuple:
    """The signals of one's own in a --signal value."""
    return tuple(s for s in (first, second) if s is not None and s.compute is not None)


def likelihood_needed(cfg: Config, signal: tuple, records: list[dict], copies: int, floor: float) -> list[int]:
    """Which candidates get the likelihood (it costs about as much as generating and inverting
    them): all of them with --score-all or where the signal reads it; with a combination whose
    first signal keeps a set per task and whose built-in second reads it (ladder+likelihood),
    those the first keeps; else none."""
    first, second = signal
    if cfg.score_all or "likelihood" in first.needs:
        return list(range(len(records)))
    if second is None or "likelihood" not in second.needs:
        return []
    if second.compute is not None or first.rule in PER_CANDIDATE_RULES:
        return list(range(len(records)))
    return kept_by_signal(records, first, None, copies, cfg.threshold, floor)


def own_signal(first: Signal, second: Signal | None) -> Signal:
    """The signal whose value a selection ranks by, its own score: a combination's second where
    the first keeps a set per task (ladder+X), else the first (inversion+execution)."""
    return second if second and first.rule not in PER_CANDIDATE_RULES else first


def kept_in_task(rule: str, values: list, threshold: float, floor: float) -> list[bool]:
    """Which of one task's candidates a rule keeps, by their values (None: no value)."""
    if rule == "threshold":
        return [v is not None and v >= threshold for v in values]
    if rule == "passes":
        return [v is not None and v == 1 for v in values]
    scored = [v for v in values if v is not None]
    if not scored:
        return [False] * len(values)
    top = max(scored)
    if rule == "ladder":
        return [v == top and top >= floor - 1e-9 for v in values]
    if rule == "group":
        return [v == top and top >= 2 for v in values]
    first = values.index(top)
    keep = rule == "rank" or top >= threshold
    return [keep and k == first for k in range(len(values))]


def kept_by_signal(records: list[dict], first: Signal, second: Signal | None, copies: int,
                   threshold: float, floor: float) -> list[int]:
    """The candidates a signal keeps, by its rule per task; records come in runs of `copies` per
    task. A combination A+B keeps what both keep (A per candidate: inversion+execution), or of
    A's set per task the one B ranks first (ladder+B; the first on a tie)."""
    kept = []
    for start in range(0, len(records), copies):
        task = records[start:start + copies]
        keep = kept_in_task(first.rule, [first.value(r) for r in task], threshold, floor)
        if second and first.rule in PER_CANDIDATE_RULES:
            keep = [a and b for a, b in zip(keep, kept_in_task(
                second.rule, [second.value(r) for r in task], threshold, floor))]
        elif second and any(keep):
            ranked = [k for k, a in enumerate(keep) if a]
            best = max(ranked, key=lambda k: -math.inf if second.value(task[k]) is None else second.value(task[k]))
            keep = [k == best for k in range(len(task))]
        kept += [start + k for k, a in enumerate(keep) if a]
    return kept


def plugin_values(signal: Signal, records: list[dict], where: str) -> list[dict]:
    """A signal of one's own computed on candidates (a command that is not usable given as None)
    and recorded on each under its name; a one-line error naming it and `where` when it fails."""
    values = checked_values(signal.name, signal.compute,
                            [r | {"command": r["command"] if r["usable"] else None} for r in records], where)
    return [r | {signal.name: v} for r, v in zip(records, values)]


def select_for_training(records: list[dict], mode: str, signal: tuple, rng: random.Random, *,
                        copies: int, threshold: float, floor: float) -> list[int]:
    """SELECT. threshold: the candidates the signal keeps (kept_by_signal). all: every candidate
    with a command (no selection). random: a random subset of those, of exactly the size the
    signal would keep. oracle: the candidates whose run matched their task's gold command's
    (gold_match, a label: this arm is the ceiling, not a label-free signal). oracle-sized: as many
    as the signal would keep, those of the highest gold_reward (a tie broken at random): random's
    twin that uses labels, the ceiling at the signal's count."""
    if mode == "oracle":
        return [i for i, r in enumerate(records) if r.get("gold_match")]
    kept = kept_by_signal(records, *signal, copies, threshold, floor)
    if mode == "threshold":
        return kept
    candidates = [i for i, r in enumerate(records) if r["command"]]
    if mode == "all":
        return candidates
    if mode == "oracle-sized":
        ties = {i: rng.random() for i in candidates}
        return sorted(sorted(candidates, key=lambda i: (-records[i]["gold_reward"], ties[i]))[:len(kept)])
    return sorted(rng.sample(candidates, min(len(kept), len(candidates))))


# ---------------------------------------------------------------------------------------------
# TRAIN: LoRA on the selected (task, command) pairs, the loss on the command's tokens only
# ---------------------------------------------------------------------------------------------

def training_example(prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """Prompt plus completion; the loss sees only the completion (prompt labels are -100)."""
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [-100] * len(prompt_ids) + completion_ids
    }


def command_example(tokenizer, task: Task, command: str) -> dict:
    """Exactly the prompt the command was generated from, then the command, then EOS."""
    return training_example(
        prompt_ids(tokenizer, command_request(task)),
        tokenizer(command, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example in the batch (dynamic padding); padding is masked out of
    attention and out of the loss (-100), whatever the pad id is (it is often the EOS id)."""
    import torch
    width = max(len(e["input_ids"]) for e in examples)
    input_ids, labels, attention = [], [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        input_ids.append(e["input_ids"] + [pad_id] * pad)
        labels.append(e["labels"] + [-100] * pad)
        attention.append([1] * len(e["input_ids"]) + [0] * pad)
    # where the loss is taken, built here (a boolean mask of the labels would be a read of the
    # device every step): the positions, row-major in the batch, whose next token is labelled
    scored = [(row * width + k, label) for row, e in enumerate(labels) for k, label in enumerate(e[1:]) if label != -100]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
            "scored_at": torch.tensor([at for at, _ in scored], dtype=torch.long),
            "scored_targets": torch.tensor([label for _, label in scored], dtype=torch.long)}


def labelled_tokens(example: dict) -> int:
    """Tokens an example's loss is taken over: its labelled positions after the first (each
    position predicts the next)."""
    return sum(label != -100 for label in example["labels"][1:])


def completion_loss(model, batch: dict):
    """Mean cross-entropy over labelled (command) tokens. Logits are computed only at those
    positions: the vocabulary projection is a large share of a small model's cost. (Running the
    prompt prefix all rows share once, as generation does, measured slower here: 1.12-1.15
    against 1.06-1.09 s a step in bf16, so it is not done.)"""
    import torch.nn.functional as F
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    logits = base.get_output_embeddings()(hidden.flatten(0, 1)[batch["scored_at"]]).float()
    return F.cross_entropy(logits, batch["scored_targets"]), len(batch["scored_targets"])


def share_loss(model, batch: list[dict], share: list[dict], pad_id: int, device: str):
    """The loss of a process's share of a batch, weighted by the share's part of the batch's
    labelled tokens: the shares' losses, and so their gradients, sum to the batch's mean loss; the
    whole batch gives exactly its mean (weight 1). Returns (loss, labelled tokens, positions run),
    loss None for an empty share."""
    if not share:
        return None, 0, 0
    collated = {k: v.to(device) for k, v in collate(share, pad_id).items()}
    mean, n = completion_loss(model, collated)
    return mean * (n / sum(map(labelled_tokens, batch))), n, collated["input_ids"].numel()


def restart_adapter(lm: LanguageModel) -> None:
    """The adapter back to its initial weights (--train-from base)."""
    from peft.utils import set_peft_model_state_dict
    set_peft_model_state_dict(lm.model, lm.fresh_adapter)


def train_adapter(lm: LanguageModel, cfg: Config, pairs: list[tuple[Task, str]], seed: int) -> dict:
    """One epoch of LoRA training on (task, command) pairs, formatted exactly as the generation
    prompt followed by the command and EOS. A fresh AdamW each cycle; the adapter carries over.

    Several processes split each batch of --batch-size examples (the global batch): each takes
    the loss of its examples' tokens weighted by their share of the batch's tokens, and the
    gradients are summed over the processes before the one optimizer step, so the step is the
    one-process step on the whole batch (up to rounding)."""
    import torch
    from tqdm import tqdm
    if not pairs:
        return {"pairs": 0, "steps": 0, "skipped": True}
    tok, model, team = lm.tokenizer, lm.model, lm.team
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = [command_example(tok, task, command) for task, command in pairs]
    rng.shuffle(examples)
    batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches))
    base = model.get_base_model()
    attention = base.config._attn_implementation
    # SDPA's bf16 backward on the CPU measured 2x slower than eager attention's (fp32: even)
    if lm.device == "cpu":
        base.set_attn_implementation("eager")
    model.train()
    losses, tokens, positions, start = [], 0, 0, time.perf_counter()
    zero = torch.zeros((), device=lm.device)  # the loss of a process's empty share
    try:
        for batch in tqdm(batches, desc="train", unit="step", leave=False,
                          disable=None if team.main else True):
            try:
                loss, n, width = share_loss(model, batch, team.share(batch), tok.pad_token_id,
                                            lm.device)
                if loss is not None:
                    loss.backward()
            except torch.OutOfMemoryError:
                raise UsageError(f"out of memory training at --batch-size {cfg.batch_size}: lower --batch-size "
                                 f"(in a new run: it changes the experiment); completed cycles are kept") from None
            tokens, positions = tokens + n, positions + width
            team.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(zero if loss is None else loss.detach())  # read once, after the epoch
    finally:
        model.eval()
        base.set_attn_implementation(attention)
    totals = torch.cat([torch.stack(losses).double(),
                        torch.tensor([tokens, positions], dtype=torch.float64, device=lm.device)])
    if team.size > 1:
        team.sum(totals)
    *losses, tokens, positions = totals.tolist()
    tokens, positions = int(tokens), int(positions)
    seconds = time.perf_counter() - start
    return {"pairs": len(pairs), "steps": len(batches), "skipped": False, "command_tokens": tokens,
            "positions": positions, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "loss_mean": round(sum(losses) / len(losses), 4), "loss_per_step": [round(x, 4) for x in losses],
            "train_s": round(seconds, 3),
            "train_tokens_per_s": round(sum(len(e["input_ids"]) for e in examples) / seconds, 1)}


# ---------------------------------------------------------------------------------------------
# Evaluation from outside the loop: NL2Bash, executed in the sandbox (support/nl2bash.py)
# ---------------------------------------------------------------------------------------------

def evaluation_items(cfg: Config) -> list[dict] | None:
    """The NL2Bash items to evaluate on (a fixed subset with --eval-limit), or None."""
    if "nl2bash" not in cfg.eval:
        return None
    try:
        return nl2bash.load_items(cfg.eval_limit or None, groups=eval_groups(cfg))
    except SandboxUnavailable as err:
        print(f"external evaluation off: {err}", flush=True)
        return None
    except ValueError as err:
        raise UsageError(f"--eval-limit: {err}") from None


def external_evaluation(lm: LanguageModel, embedder, cfg: Config, items: list[dict], cycle: int,
                        benchmark: "Benchmark") -> tuple[dict | None, list[dict]]:
    """The model's greedy command for every benchmark query, in the prompt format it trains on,
    executed in the sandbox against the gold command; and the intrinsic score of the same
    command, so the run shows whether the intrinsic signal tracks real quality (Spearman).
    (None, []) where the sandbox cannot run: nothing is ever executed outside it."""
    seed = stage_seed(cfg.seed, benchmark.key, cycle)
    written = generate_commands(lm, cfg, [Task(item["query"], item.get("tool")) for item in items], copies=1,
                                greedy=True, seed=seed, label=benchmark.key)
    start = time.perf_counter()
    try:
        results = nl2bash.score_in_sandbox(items, [r["command"] for r in written.records],
                                           sandbox_workers(cfg, lm.team), lm.team, benchmark.setups)
    except SandboxUnavailable as err:  # nothing is ever executed outside it
        print(f"  eval    skipped: {err}", flush=True)
        return None, []
    execute_s = time.perf_counter() - start
    judged = judge_commands(lm, embedder, cfg, written.records, frozen=cfg.judge == "frozen",
                            greedy=True, seed=seed, label=benchmark.key)
    records = [{"id": item["id"], "difficulty": item["difficulty"]} | r | {
        k: result[k] for k in ("reward", "success", "nlc2cmd", "exact", "timed_out", "beats_reward",
                               "nothing_reward", "trivial_item", "gold_broken")}
        for item, r, result in zip(items, judged.records, results)]
    scores = [r["score"] for r in records]
    timing = {"generate_s": written.timing["generate_s"], "execute_s": round(execute_s, 3),
              "judge_s": round(judged.timing["invert_s"] + judged.timing["score_s"], 3)}
    summary = nl2bash.summarize(results, items) | {
        "mean_intrinsic_score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        **score_correlations(records),
        "seconds": round(sum(timing.values()), 3), "timing": timing}
    log_evaluation(summary, benchmark.label)
    return summary, records


@dataclass(frozen=True)
class Benchmark:
    """An evaluation from outside the loop: its key in progress.json (the cycle's entry; "<key>_
    initial" before training) and its files (<key>_cycle_N.jsonl), its label in the output, and
    the sandbox's file systems (None: NL2Bash's)."""
    key: str
    label: str
    setups: dict | None = None


def benchmarks(cfg: Config, domain: dict) -> list[tuple[Benchmark, list[dict]]]:
    """The run's evaluations with their items: NL2Bash (eval), the domain's held-out tasks
    (eval_domain; check_golds_there has checked the domain can)."""
    chosen = []
    items = evaluation_items(cfg)
    if items:
        chosen.append((Benchmark("eval", "eval"), items))
    if "domain" in cfg.eval:
        chosen.append((Benchmark("eval_domain", "eval domain", {"domain": (environment_script(domain), None)}),
                       held_out_items(domain)))
    return chosen


def uses_golds(cfg: Config) -> bool:
    """Whether SELECT reads the gold commands (the oracle arms, named as using labels)."""
    return cfg.select in ("oracle", "oracle-sized")


def check_golds_there(cfg: Config, domain: dict) -> None:
    """--eval domain and --select oracle need every template's gold command, and a file system
    to run them in: one error line where the domain lacks them."""
    asking = [flag for flag, asked in (("--eval domain", "domain" in cfg.eval),
                                       (f"--select {cfg.select}", uses_golds(cfg))) if asked]
    if asking and not has_golds(domain):
        raise UsageError(f"{' and '.join(asking)} compare commands with their tasks' gold commands, and the "
                         f"{domain_label(cfg)} domain has none for some of its templates (bash has them; a "
                         f"--tasks-file domain can carry a 'gold' per template, see docs/tasks.md)")
    if asking and environment_script(domain) is None:
        raise UsageError(f"{' and '.join(asking)} run commands in the domain's file system, and the "
                         f"{domain_label(cfg)} domain has none (a --tasks-file domain can declare one, see "
                         f"docs/tasks.md)")


# ---------------------------------------------------------------------------------------------
# The cycle loop
# ---------------------------------------------------------------------------------------------

def fresh_batch(lm: LanguageModel, embedder, sandbox, cfg: Config, domain: dict, index: int,
                probe_tasks: list[Task], checker=None) -> tuple[Stage, list[dict]]:
    """GENERATE, INVERT, SCORE on fresh tasks (never the probe's or the held-out set's), `--candidates` sampled
    commands each; and each command executed where the domain has a sandbox. The probe's tasks
    ride along in the same decoding passes, greedy, one command each (the sampled rows draw as
    they would alone): returned apart, generated, inverted and scored by the run's judge."""
    seed, rng = stage_seed(cfg.seed, "batch",
                           index), random.Random(stage_seed(cfg.seed, "tasks", index))
    never = frozenset(t.text for t in probe_tasks) | held_out_texts(domain)  # measured, never trained on
    if cfg.task_source == "model":
        tasks, task_info = write_tasks(lm, cfg, domain, cfg.tasks, rng, seed, never)
    else:
        tasks, task_info = draw_tasks(domain, cfg.tasks, rng, exclude=never), {}
    signal = resolve_signal(cfg.signal)
    stage = run_stage(lm, embedder, cfg, tasks + probe_tasks,
                      copies=[cfg.candidates] * len(tasks) + [1] * len(probe_tasks),
                      greedy=[False] * len(tasks) + [True] * len(probe_tasks), seed=seed,
                      label=f"batch {index}" + (" and probe" if probe_tasks else ""),
                      certainty="certainty" in signal_needs(*signal))
    if checker is not None and tools_due(cfg, index - 1):
        tooled = check_tools(checker, stage.records, lm.team)
        stage = Stage(tooled.records, stage.timing | tooled.timing)
    sampled = len(tasks) * cfg.candidates  # the batch's records come first, the probe's after
    records, probe_records = stage.records[:sampled], stage.records[sampled:]
    golds = [gold_command(domain, t.text) for t in tasks] if uses_golds(cfg) else None
    executed = (execute_commands(sandbox, records, cfg.candidates, lm.team, golds) if sandbox
                else Stage(records, {}))
    floor = ladder_floor(shellcheck.shellcheck_available())
    needed = likelihood_needed(cfg, signal, executed.records, cfg.candidates, floor)
    liked = (likelihood_values(lm, cfg, executed.records, needed) if needed
             else Stage(executed.records, {}))
    records = liked.records
    for plugin in plugins_of(*signal):
        records = plugin_values(plugin, records, f"in cycle {index - 1}")
    return Stage(records, stage.timing | executed.timing | liked.timing | task_info), probe_records


def probe(lm: LanguageModel, embedder, sandbox, cfg: Config, judged: list[dict],
          cycle: int) -> tuple[dict, list[dict]]:
    """The fixed probe set, its greedy commands generated and judged by the run's judge in the
    fresh batch's passes (`judged`): their likelihood where the signal uses it, their execution,
    and their judgement by the frozen base model. Its seconds are these; the commands' and the
    run's judge's are counted in the batch's."""
    if not judged:
        return {}, []
    seed, signal = stage_seed(cfg.seed, "probe", cycle), resolve_signal(cfg.signal)
    # the probe's likelihood is its signal's own score for the likelihood signals
    liked = (likelihood_values(lm, cfg, judged) if cfg.score_all or "likelihood" in signal_needs(*signal)
             else Stage(judged, {}))
    executed = (execute_commands(sandbox, liked.records, 1, lm.team) if sandbox
                else Stage(liked.records, {}))
    for plugin in plugins_of(*signal):
        executed = Stage(plugin_values(plugin, executed.records, f"in cycle {cycle} (the probe)"), executed.timing)
    # before any training the adapter adds exactly zero: the frozen judge is the run's judge
    frozen = Stage(judged, {}) if cfg.judge == "frozen" or cycle == 0 else judge_commands(
        lm, embedder, cfg, judged, frozen=True, greedy=True, seed=seed, label="probe, frozen judge")
    records = [r | {"frozen_reconstruction": f["reconstruction"], "frozen_score": f["score"]}
               for r, f in zip(executed.records, frozen.records)]
    frozen_summary = summarize(frozen.records, cfg.scorer)
    seconds = sum(v for t in (liked.timing, executed.timing, frozen.timing) for k, v in t.items() if k.endswith("_s"))
    summary = summarize(executed.records, cfg.scorer, plugins_of(*signal)) | {
        "frozen_mean_score": frozen_summary["mean_score"],
        "frozen_acceptance_rate": frozen_summary["acceptance_rate"], "seconds": round(seconds, 3)}
    passed = (f", execution passed {summary['execution_pass_rate']:.2f}"
              if "execution_pass_rate" in summary else "")
    passed += f", {tools_line(summary)}" if "tools_accepted_rate" in summary else ""
    own = "".join(f", {p.summary} {summary[p.summary]:.3f}" for p in plugins_of(*signal)
                  if summary.get(p.summary) is not None)
    print(f"  probe   mean score {summary['mean_score']:.3f} (frozen judge "
          f"{summary['frozen_mean_score']:.3f}), accepted {summary['accepted']}/{summary['total_generated']}, "
          f"unusable {summary['unusable_commands']}{passed}{own} ({seconds:.1f}s)", flush=True)
    return summary, records


def start_history(lm: LanguageModel, embedder, sandbox, cfg: Config, run_dir: Path,
                  probe_judged: list[dict], evaluations: list) -> dict:
    """A new run's history, with cycle 0: the untrained model's probe (`probe_judged`: its
    commands, judged in the first batch's passes) and evaluation."""
    # processes[c]: how many processes ran cycle c (0: the untrained model's probe and evaluation)
    history = {"cycles": [], "total_generated": 0, "total_accepted": 0, "config": experiment_settings(cfg),
               "compute": compute_record(lm) | {"processes": [lm.team.size]}}
    history["probe_initial"], records = probe(lm, embedder, sandbox, cfg, probe_judged, 0)
    if lm.team.main:
        write_jsonl(run_dir / "probe_cycle_0.jsonl", records)
    for benchmark, items in evaluations if cfg.eval_every else []:
        history[f"{benchmark.key}_initial"], records = external_evaluation(lm, embedder, cfg, items, 0, benchmark)
        if lm.team.main:
            write_jsonl(run_dir / f"{benchmark.key}_cycle_0.jsonl", records)
    return history


def start_or_resume(lm: LanguageModel, embedder, sandbox, cfg: Config, run_dir: Path, saved: dict | None,
                    domain: dict, probe_tasks: list[Task], evaluations,
                    checker=None) -> tuple[dict, Stage, list[dict], int]:
    """The history, the batch the next cycle trains on, the pool of selected pairs, and that
    cycle's number: a new run's cycle 0 (the untrained model's first batch, probe and evaluation),
    or what a resumed run's last checkpoint holds."""
    if saved is None:
        print("cycle 0 (before any training)", flush=True)
        pending, probe_judged = fresh_batch(lm, embedder, sandbox, cfg, domain, 1, probe_tasks, checker)
        return start_history(lm, embedder, sandbox, cfg, run_dir, probe_judged, evaluations), pending, [], 1
    last = saved["last_completed_cycle"]
    records, timing, pool = load_checkpoint(lm, run_dir, last)
    print(f"resuming {run_dir} after cycle {last}", flush=True)
    return resumed_history(saved, compute_record(lm), lm.team.size), Stage(records, timing), pool, last + 1


def cycle_examples(before: list[dict], chosen: set, after: list[dict],
                   probe: list[dict]) -> list[dict]:
    """examples_cycle_N.jsonl: every candidate of the cycle, marked with its stage (and, in the
    batch trained on, whether it was selected)."""
    return ([r | {"stage": "before", "selected": i in chosen} for i, r in enumerate(before)]
            + [r | {"stage": "after"} for r in after] + [r | {"stage": "probe"} for r in probe])


def signal_up_execution_down(signal: str, previous: dict, probe: dict) -> bool | None:
    """Goodhart's mark: the probe's mean of the signal's own score rose from the cycle before
    while the probe's execution pass rate (label-free: the domain's file system) fell. None
    where either was not measured, or where the own score is execution itself (not watched)."""
    own = own_signal(*resolve_signal(signal))
    figures = [(p or {}).get(k) for p in (previous, probe) for k in (own.summary, "execution_pass_rate")]
    if None in figures or not own.watched:
        return None
    score_before, passed_before, score, passed = figures
    return score > score_before and passed < passed_before


def run_cycles(cfg: Config, run_dir: Path, saved: dict | None, domain: dict, sandbox,
               team: Team, reporter, checker=None) -> dict:
    """The loop, from cycle 0 or from the last completed cycle of `saved`; `sandbox` runs the
    commands in the domain's file system (None: not run), `checker` puts them to the domain's real
    tools (None: not), `reporter` shows each completed cycle where runs are watched (--report-to).
    Every process of the team runs it; only the main one writes the run directory."""
    probe_tasks = draw_tasks(domain, cfg.probe_tasks, random.Random(stage_seed(cfg.seed, "probe")),
                             exclude=held_out_texts(domain), distinct=True)
    # the other processes learn whether the main one could write the run directory
    team.together(lambda: prepare_run_directory(run_dir, saved["last_completed_cycle"] if saved else -1)
                  if team.main else None)
    evaluations = benchmarks(cfg, domain)
    signal, floor = resolve_signal(cfg.signal), ladder_floor(shellcheck.shellcheck_available())
    started = time.perf_counter()
    lm, embedder = load_models(cfg, team)
    print(f"run directory {run_dir}", flush=True)
    history, pending, pool, first_cycle = start_or_resume(lm, embedder, sandbox, cfg, run_dir, saved, domain,
                                                          probe_tasks, evaluations, checker)

    # The loop is pipelined: the batch a cycle trains on was generated, inverted and scored at the
    # end of the cycle before, by the model as it was then (cycle 1's, by the untrained model).
    # That batch is this cycle's "before"; the fresh batch the trained model makes is its "after"
    # and the next cycle's training batch. So each cycle runs SELECT and TRAIN first.
    for cycle in range(first_cycle, cfg.cycles + 1):
        cycle_start = time.perf_counter()
        print(f"cycle {cycle}/{cfg.cycles}", flush=True)
        before_stage = pending
        before = summarize(before_stage.records, cfg.scorer, plugins_of(*signal))
        log_stage("before", before_stage, before)

        # SELECT: the candidates the signal keeps, from the batch generated last cycle
        chosen = select_for_training(before_stage.records, cfg.select, signal,
                                     random.Random(stage_seed(cfg.seed, "select", cycle)),
                                     copies=cfg.candidates, threshold=cfg.threshold, floor=floor)
        selected = [{k: before_stage.records[i][k] for k in ("task", "tool", "command")} for i in chosen]
        pool = pool + selected if cfg.data == "cumulative" or cfg.train_from == "base" else selected

        # TRAIN: one epoch of LoRA on the pool (ReST-EM: a fresh adapter on all selected so far)
        if cfg.train_from == "base":
            restart_adapter(lm)
        pairs = [(Task(p["task"], p["tool"]), p["command"]) for p in pool]
        training = {"selected": len(selected)} | train_adapter(
            lm, cfg, pairs, seed=stage_seed(cfg.seed, "train", cycle))
        log_training(training)

        # GENERATE, INVERT, SCORE fresh tasks with the trained model, and their signals: this
        # cycle's "after" (the fixed probe tasks ride along, greedy)
        after_stage, probe_judged = fresh_batch(lm, embedder, sandbox, cfg, domain, cycle + 1, probe_tasks,
                                                checker)
        after = summarize(after_stage.records, cfg.scorer, plugins_of(*signal))
        log_stage("after", after_stage, after)

        # PROBE and EVALUATE: the fixed probe tasks, greedy; NL2Bash, executed
        probe_summary, probe_records = probe(lm, embedder, sandbox, cfg, probe_judged, cycle)
        evaluated = {"eval": None}  # NL2Bash's (None when off), and the domain's held-out tasks' where asked
        for benchmark, items in evaluations:
            evaluated[benchmark.key] = None
            if (cfg.eval_every and cycle % cfg.eval_every == 0) or cycle == cfg.cycles:
                evaluated[benchmark.key], records = external_evaluation(lm, embedder, cfg, items, cycle, benchmark)
                if team.main:
                    write_jsonl(run_dir / f"{benchmark.key}_cycle_{cycle}.jsonl", records)

        # SAVE: the cycle's examples and checkpoint, then its figures (progress.json last marks it done)
        if team.main:
            examples = cycle_examples(before_stage.records, set(chosen), after_stage.records, probe_records)
            write_jsonl(run_dir / f"examples_cycle_{cycle}.jsonl", examples)
            save_checkpoint(lm, run_dir, cycle, after_stage, pool)
        previous_probe = history["cycles"][-1]["probe"] if history["cycles"] else history["probe_initial"]
        entry = {"cycle": cycle, "before": before, "after": after,
                 "improvement": round(after["mean_score"] - before["mean_score"], 4),
                 "probe": probe_summary, "training": training, **evaluated,
                 "collapse": collapse_reasons(after["health"]),
                 "signal_up_execution_down": signal_up_execution_down(cfg.signal, previous_probe, probe_summary),
                 "timing": {"before": before_stage.timing, "after": after_stage.timing,
                            "cycle_s": round(time.perf_counter() - cycle_start, 3)}}
        progress = record_cycle(run_dir, history, entry, team.size, team.main)
        report_cycle(reporter, history, entry, after_stage.records, cfg.candidates)
        pending = after_stage
        if log_cycle_end(entry, cfg.signal, cfg.cycles, cfg.stop_on_collapse, time.perf_counter() - cycle_start,
                         time.perf_counter() - started):
            break

    if team.main:
        log_done(run_dir, history, time.perf_counter() - started, probed=cfg.probe_tasks > 0)
    return progress


def run(cfg: Config, team: Team = Team()) -> dict:
    """A run from its checks to its last cycle: the run directory checked, the domain's sandbox
    opened, the run directory held (a second start of the same run stops here), then the cycles.
    Bad input of any kind stops it before anything is written or loaded."""
    run_dir = run_directory(cfg)
    saved = check_run_directory(run_dir, cfg, experiment_settings(cfg), CONFIG_DEFAULTS)
    domain = load_domain(cfg.tasks_file, cfg.domain)
    check_golds_there(cfg, domain)
    check_tools_there(cfg, domain)
    if uses_golds(cfg) and team.main:
        print(f"note: --select {cfg.select} trains on the candidates " + (
              "that match their task's gold command" if cfg.select == "oracle" else
              "whose runs come closest to their task's gold command's") + ": it uses labels (a ceiling of "
              "selection), it is not a label-free signal", flush=True)
    team.wait()  # every process has read the run directory before the main process tidies it
    if saved is not None and saved["last_completed_cycle"] >= cfg.cycles:
        print(f"{run_dir}: already completed {saved['last_completed_cycle']} cycles; nothing to do "
              f"(raise --cycles to continue)")
        if team.main and not (run_dir / "self_improvement_results.json").exists():  # stopped while writing it
            with contextlib.closing(hold_run_directory(run_dir)):
                prepare_run_directory(run_dir, saved["last_completed_cycle"])
                write_results(run_dir, saved["history"], wall_s=None)
        return saved
    with contextlib.ExitStack() as opened:  # each sandbox is removed however the run ends
        sandbox = team.together(lambda: open_sandbox(cfg, domain, team))
        if sandbox is not None:
            opened.enter_context(sandbox)
        checker = team.together(lambda: open_tool_checker(cfg, domain, team))
        if checker is not None:
            opened.enter_context(checker)
        lock = team.together(lambda: hold_run_directory(run_dir) if team.main else None)
        reporter = open_reporter(cfg.report_to, run_dir, main=team.main, resumed=saved is not None)
        try:
            return run_cycles(cfg, run_dir, saved, domain, sandbox, team, reporter, checker)
        finally:
            reporter.close()
            if lock is not None:
                lock.close()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    now = Invocation(argv)  # what the one line of a stopped command needs: the team, the run directory
    on_sigterm = signal.signal(signal.SIGTERM, terminated)  # a team's processes replace it (join_team)
    try:
        now.team = team_from_environment()
        if argv[:1] == ["compare"]:
            compare(argv[1:], Config)
        elif argv[:1] == ["audit"]:  # a program of its own, support/audit_program.py
            from support.audit_program import main as audit
            now.auditing = True
            audit(argv[1:], join=lambda config: now.joined(join_team(config)))
        else:
            cfg = parse_config(argv)
            now.run_dir, now.resumed = run_directory(cfg), cfg.resume
            now.team = join_team(cfg)
            run(cfg, now.team)
    except (UsageError, PeerFailed, KeyboardInterrupt, Terminated, OSError) as stop:
        return stopped(stop, now)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        leave_team(now.team)
    return 0


if __name__ == "__main__":
    sys.exit(main())
