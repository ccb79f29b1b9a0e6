"""Task domains: the built-in ones (support/domains/*.json) and a user's --tasks-file, read and
checked by one loader; and the file system built from a domain for executing commands.

A domain is templates with {slots} (docs/tasks.md has the format); a table of plain tasks
(.jsonl, .csv, .parquet, or a hub dataset) becomes a domain of fixed tasks.

A template may carry a gold command with the same slots (a label: it feeds only the evaluation in
the domain and the oracle arm, never a signal): gold_command finds a task's.

The rest may call: load_domain, builtin_domain, check_domain, load_task_table, environment_script,
read_domain_file, template_slots, fill, template_pattern, gold_command, has_golds, SLOT_PATTERN,
TABLE_FORMATS, DOMAINS.
"""
import json
import random
import re
import shlex
from pathlib import Path

from support import UsageError

DOMAINS = Path(__file__).with_name("domains")  # the built-in domains, one JSON file each


# ---------------------------------------------------------------------------------------------
# Domains: templates with {slots}, or a table of plain tasks
# ---------------------------------------------------------------------------------------------

SLOT_PATTERN = re.compile(r"\{(\w+)\}")


def check_domain(domain, source: str) -> dict:
    """Validate a task domain (built-in or from --tasks-file), naming the first thing wrong."""
    def fail(msg):
        raise UsageError(f"{source}: {msg}")
    if not isinstance(domain, dict):
        fail("the top level must be a JSON object with 'templates' (and 'slots' if they use any)")
    unknown = set(domain) - {"name", "slots", "templates", "environment", "tools"}
    if unknown:
        fail(f"unknown key(s) {sorted(unknown)}; expected 'name', 'slots', 'templates', 'environment', 'tools'")
    tools = domain.get("tools", [])
    if not (isinstance(tools, list) and all(isinstance(t, str) and re.fullmatch(r"[\w.+-]+", t) for t in tools)):
        fail("'tools' must be a list of program names (the tools whose own parsers judge the commands: --eval tools)")
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
        if set(template) - {"task", "tool", "gold", "slots"}:
            fail(f"templates[{i}] has unknown key(s) {sorted(set(template) - {'task', 'tool', 'gold', 'slots'})}")
        if "tool" in template and not (isinstance(template["tool"], str) and template["tool"].strip()):
            fail(f"templates[{i}].tool must be a non-empty string")
        for slot in SLOT_PATTERN.findall(template["task"]):
            if slot not in slots:
                fail(f"templates[{i}] uses slot {{{slot}}}, which is not in 'slots'")
        own = template.get("slots", {})
        if not isinstance(own, dict):
            fail(f"templates[{i}].slots must be an object: the values this template draws, by slot")
        for slot, values in own.items():
            if slot not in SLOT_PATTERN.findall(template["task"]):
                fail(f"templates[{i}].slots names {{{slot}}}, which its task does not use")
            if not (isinstance(values, list) and values and set(values) <= set(slots.get(slot, ()))):
                fail(f"templates[{i}].slots.{slot} must be a non-empty list of values of slots.{slot}")
        if "gold" in template:
            if not (isinstance(template["gold"], str) and template["gold"].strip()):
                fail(f"templates[{i}].gold must be a non-empty string (a command with the task's slots)")
            extra = set(SLOT_PATTERN.findall(template["gold"])) - set(SLOT_PATTERN.findall(template["task"]))
            if extra:
                fail(f"templates[{i}].gold uses slot(s) {sorted(extra)} its task does not name")
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


def load_domain(tasks_file: str | None, builtin: str) -> dict:
    """--tasks-file when given (a JSON domain or a table of tasks), else the built-in domain."""
    if tasks_file is None:
        return builtin_domain(builtin)
    if Path(tasks_file).suffix != ".json":
        return load_task_table(tasks_file)
    return read_domain_file(Path(tasks_file), f"--tasks-file {tasks_file}")


def builtin_domain(name: str) -> dict:
    """A built-in domain (support/domains/NAME.json), read and checked as --tasks-file is."""
    return read_domain_file(DOMAINS / f"{name}.json", f"built-in domain {name}")


def read_domain_file(path: Path, source: str) -> dict:
    try:
        domain = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{source}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{source}: not valid JSON ({err})") from None
    return check_domain(domain, source)


def template_slots(template: dict, slots: dict) -> dict:
    """The values a template draws for each slot: the domain's, or the template's own subset
    (where its gold command needs it: the files that hold a pattern, the directories with files
    of an extension)."""
    return slots | template.get("slots", {})


def fill(text: str, values: dict) -> str:
    """A template's text (its task or its gold) with its slots filled."""
    return SLOT_PATTERN.sub(lambda m: values[m.group(1)], text)


def template_pattern(template: dict, slots: dict) -> re.Pattern:
    """A regular expression that matches exactly the tasks the template makes, each slot's value
    (one of its values, the longest first) captured under the slot's name."""
    slots = template_slots(template, slots)
    parts, seen, last = [], set(), 0
    for m in SLOT_PATTERN.finditer(template["task"]):
        parts.append(re.escape(template["task"][last:m.start()]))
        slot = m.group(1)
        if slot in seen:
            parts.append(f"(?P={slot})")
        else:
            seen.add(slot)
            parts.append(f"(?P<{slot}>" + "|".join(re.escape(v) for v in sorted(slots[slot], key=len, reverse=True)) + ")")
        last = m.end()
    parts.append(re.escape(template["task"][last:]))
    return re.compile("".join(parts))


def gold_command(domain: dict, task_text: str) -> str | None:
    """A task's known answer (a label: for evaluation and the oracle arm only): the gold command of
    the domain's first template with one that makes this task, with the task's slot values; None
    where no such template makes it."""
    slots = domain.get("slots", {})
    for template in domain["templates"]:
        if "gold" not in template:
            continue
        if template.get("plain"):  # a table's task: its text as it is
            if template["task"] == task_text:
                return template["gold"]
        elif found := template_pattern(template, slots).fullmatch(task_text):
            return fill(template["gold"], found.groupdict())
    return None


def has_golds(domain: dict) -> bool:
    """Whether every template of the domain carries a gold command."""
    return all("gold" in template for template in domain["templates"])


# ---------------------------------------------------------------------------------------------
# The file system a domain's commands run in (--signal execution, agreement)
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
