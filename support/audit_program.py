"""The audit, a program of its own: `python intrinsic_self_improvement.py audit`. For each NL2Bash
item, --candidates sampled commands and the greedy one, every label-free signal of the signal
table (and any of one's own, `--signal path/to/file.py:NAME`) computed for each by the loop's own
stages, and InterCode's execution truth against the gold command; then the figures
(support/audit.py), written chunk by chunk so a stopped audit continues (docs/audit.md).
With --eval domain the items are a domain's held-out tasks and their golds; with --eval tools,
a domain without golds (pentest): its tasks, the truth whether the real tool accepts the command
line (support/tools.py), and the signals that need no file system.

It imports the stages it needs from intrinsic_self_improvement.py; nothing the loop needs lives
here. The rest may call: main.
"""
import argparse
import contextlib
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import intrinsic_self_improvement as isi
from support import UsageError, nl2bash
from support.audit import audit_table, beats_nothing
from support.cli import OneLineParser, add_config_flags, eval_groups
from support.audit_directory import audited_so_far, read_audit, read_candidates, write_changes, write_figures
from support.decoder import per_row
from support.model import EMBEDDED_MODEL, compute_record, load_models
from support.run_directory import hold_run_directory, load_adapter, read_progress, write_json, write_jsonl
from support.sandbox import Sandbox, SandboxUnavailable
from support import shellcheck as static_analyser
from support.domain_eval import held_out_items, tool_items
from support.tasks import environment_script, load_domain
from support.team import Team, join_team
from support.tools import ToolChecker, installed
from support.tracking import check_reporter, report_audit

FLAGS = ("model", "candidates", "temperature", "invert_temperature", "threshold", "judge",
         "seed", "domain", "tasks_file", "eval", "eval_limit", "eval_fs", "eval_workers", "embedder",
         "device", "precision", "quantize", "cpu_matmul", "max_command_tokens",
         "max_inversion_tokens", "gen_batch_size", "output", "name", "report_to")
DEFAULTS = {"candidates": 8, "domain": "bash", "output": "./output/audit", "model": None, "eval": "nl2bash"}
RUN_ONLY = {"output", "name", "eval_workers", "cpu_matmul", "device", "report_to"}
# the audit's items and truth: NL2Bash's, the domain's held-out tasks against their gold commands, or
# the domain's tasks against its real tools' verdict (a domain that names tools and has no golds)
AUDITED_ON = ("nl2bash", "domain", "tools")


def parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="intrinsic_self_improvement.py audit", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score every label-free signal against execution truth on NL2Bash (or, with "
        "--eval domain, on the task domain's held-out tasks against their gold commands; with --eval "
        "tools, on the tasks of a domain that names its tools, such as pentest, against whether the "
        "real tool accepts the command line): for each "
        "item, --candidates sampled commands and the greedy one, every signal computed for each, "
        "and InterCode's reward against the gold command; AUROC, Spearman and top-1 reranking "
        "with bootstrap intervals over items (docs/audit.md). The same command continues a "
        "stopped audit.")
    add_config_flags(parser, isi.Config, list(FLAGS), DEFAULTS)
    parser.add_argument("--signal", dest="signals", action="append", default=[], metavar="FILE.py:NAME",
                        help="also audit a signal of your own: a function in a file (docs/signals.md); "
                        "repeat for several")
    parser.add_argument("--adapter", default=None, metavar="RUN_DIR/checkpoint_cycle_N",
                        help="audit a trained model: the adapter of a run's checkpoint (its model "
                        "and LoRA shape come from the run; --judge frozen makes the base model judge)")
    parser.add_argument("--from", dest="from_dir", default=None, metavar="AUDIT_DIR",
                        help="recompute the figures, table and plot from an audit's candidates file")
    parser.add_argument("--against", default=None, metavar="AUDIT_DIR",
                        help="with --from: each signal's change from this audit of the same items "
                        "(say, the untrained model's) to --from's, with paired bootstrap intervals")
    parser.add_argument("--truth-again", action="store_true",
                        help="with --from: execute the candidates again against the gold commands "
                        "(the execution truth only: no model is loaded)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws over items")
    parser.add_argument("--margin", type=float, default=None,
                        help="beats_nothing: reward at least this above the do-nothing command's "
                        "(default: support/audit.py's BEATS_NOTHING_MARGIN, 0.05)")
    parser.add_argument("--chunk-items", type=int, default=25,
                        help="items written at a time: a stopped audit loses at most one chunk")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for name in ("against", "truth_again"):
        if getattr(args, name) and args.from_dir is None:
            raise UsageError(f"--{name.replace('_', '-')} goes with --from AUDIT_DIR")
    if args.margin is not None and not 0 <= args.margin <= 1:
        raise UsageError(f"--margin must be in [0, 1], got {args.margin}")
    for name in ("bootstrap", "chunk_items"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_reporter(args.report_to)
    if args.from_dir is not None and args.signals:
        raise UsageError("--signal computes a signal on a model's candidates; --from recomputes the figures only")
    args.plugins = [isi.load_plugin(spec) for spec in args.signals]
    if len({p.name for p in args.plugins}) < len(args.plugins):
        raise UsageError("--signal: two signals of the same name")
    return args


def audit_config(args: argparse.Namespace) -> isi.Config:
    """The audit's Config: its flags, the model and LoRA shape of --adapter's run, checked."""
    values = {name: getattr(args, name) for name in FLAGS}
    if args.adapter is not None:
        checkpoint = Path(args.adapter)
        if not (checkpoint / "adapter_model.safetensors").is_file():
            raise UsageError(f"--adapter {checkpoint}: no adapter there (adapter_model.safetensors); "
                             f"give a run's RUN_DIR/checkpoint_cycle_N")
        trained = read_progress(checkpoint.parent / "progress.json", "--adapter: ",
                                "")["history"]["config"]
        if values["model"] not in (None, trained["model"]):
            raise UsageError(f"--adapter {checkpoint} was trained on --model {trained['model']}, "
                             f"not {values['model']}")
        values |= {k: trained[k] for k in ("model", "lora_r", "lora_alpha", "lora_dropout")}
    values["model"] = values["model"] or EMBEDDED_MODEL
    if values["eval"] not in AUDITED_ON:
        raise UsageError(f"audit --eval: nl2bash (InterCode's items), domain (the task domain's held-out "
                         f"tasks) or tools (the domain's tasks, against its real tools), got {values['eval']}")
    cfg = isi.validate(isi.Config(**values))
    domain = load_domain(cfg.tasks_file, cfg.domain)
    if cfg.eval == "tools":
        isi.check_tools_there(cfg, domain)
        for plugin in args.plugins:
            if "execution" in plugin.needs:
                raise UsageError(f"--signal {plugin.name} needs execution, and audit --eval tools runs no "
                                 f"command in a file system (only the domain's tools, for the truth)")
        return cfg
    if environment_script(domain) is None:
        raise UsageError(f"audit runs commands in the domain's file system, and the "
                         f"{isi.domain_label(cfg)} domain has none (bash has one"
                         f"{'; audit --eval tools audits against its tools' if domain.get('tools') else ''})")
    isi.check_golds_there(cfg, domain)
    return cfg


def audited_items(cfg: isi.Config, tools=()) -> tuple[list[dict], dict | None]:
    """The items an audit scores and the file systems their truth runs in (None: NL2Bash's):
    NL2Bash's (a fixed subset with --eval-limit), with --eval domain the domain's held-out
    tasks, with --eval tools the domain's tasks of the `tools` installed here (the same subset
    rule; no file system)."""
    if cfg.eval in ("domain", "tools"):
        domain = load_domain(cfg.tasks_file, cfg.domain)
        try:
            if cfg.eval == "tools":
                return nl2bash.evenly_spread(tool_items(domain, tools), cfg.eval_limit or None), None
            return (nl2bash.evenly_spread(held_out_items(domain), cfg.eval_limit or None),
                    {"domain": (environment_script(domain), None)})
        except ValueError as err:
            raise UsageError(f"--eval-limit: {err}") from None
    try:
        return nl2bash.load_items(cfg.eval_limit or None, groups=eval_groups(cfg)), None
    except ValueError as err:
        raise UsageError(f"--eval-limit: {err}") from None
    except SandboxUnavailable as err:
        raise UsageError(f"audit: {err}") from None


def audit_name(cfg: isi.Config, adapter: str | None, plugins: list = ()) -> str:
    """model_base or model_RUN_cycleN, with K and the seed (and one's own signals, by name)."""
    model = "smollm2-135m" if cfg.model == EMBEDDED_MODEL else Path(cfg.model.rstrip("/")).name
    trained = "base" if adapter is None else (
        f"{Path(adapter).resolve().parent.name}_{Path(adapter).name.replace('checkpoint_', '')}")
    judge = "_frozen-judge" if cfg.judge == "frozen" else ""
    own = "".join(f"_{p.name}" for p in plugins)
    on = {"domain": "-held-out", "tools": "-tools"}.get(cfg.eval)
    on = f"_{cfg.domain if cfg.tasks_file is None else Path(cfg.tasks_file).stem}{on}" if on else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}_{trained}{judge}{on}_k{cfg.candidates}_seed{cfg.seed}{own}")


# ---------------------------------------------------------------------------------------------
# The columns: the signal table's audited signals, then one's own
# ---------------------------------------------------------------------------------------------

def audited_signals(plugins: list, on_tools: bool = False) -> list:
    """The columns' signals; on the tools' truth (--eval tools) those that need no file system."""
    return [s for s in isi.SIGNALS.values() if s.audited and not (on_tools and "execution" in s.needs)] + plugins


class Column(NamedTuple):
    """One column of the audit: its name, the signal it reads, the scorer its reconstruction was
    scored by (inversion's), whether its commands ran in the item's own file system, and the
    timers its cost per candidate sums."""
    name: str
    signal: object
    scorer: str | None
    itemfs: bool
    timers: tuple


def columns(signals: list) -> list[Column]:
    """The audit's columns in the order a candidate's signals are written: every signal (one per
    scorer for inversion), then those also run in the item's own file system."""
    out = []
    for s in signals:
        for name, timers in s.variants or ((s.name, s.cost),):
            out.append(Column(name, s, name.removeprefix("inversion_") if s.variants else None, False, timers))
    for s in signals:
        if s.itemfs:
            out.append(Column(f"{s.name}_itemfs", s, None, True,
                              tuple("execution_itemfs" if t == "execution" else t for t in s.cost)))
    return out


def column_rules(signals: list) -> dict:
    return {c.name: c.signal.column_rule or c.signal.rule for c in columns(signals)}


def rule_keeps(threshold: float, shellcheck: bool):
    """The loop's per-task rules, as the figures take them: (rule, values) -> kept."""
    floor = isi.ladder_floor(shellcheck)
    return lambda rule, values: isi.kept_in_task(rule, values, threshold, floor)


def column_value(signal, record: dict):
    value = (signal.column or signal.value)(record)
    return int(value) if isinstance(value, bool) else value


# ---------------------------------------------------------------------------------------------
# One chunk of items: every candidate with every signal, and its execution truth
# ---------------------------------------------------------------------------------------------

def audit_inversion(lm, embedder, cfg: isi.Config, records: list[dict], *, greedy, seed: int,
                    label: str) -> tuple[dict, dict]:
    """The published round trip as SELECT computes it, by the judge: one reconstruction per
    command, scored by each scorer. Per scorer, the records scored; and the seconds of each."""
    with lm.model.disable_adapter() if cfg.judge == "frozen" else contextlib.nullcontext():
        inverted = isi.invert_commands(lm, cfg, records, greedy=greedy, seed=seed, label=label)
        scored, seconds = {}, {}
        for scorer in ("embed", "lexical", "mix"):
            stage = isi.score_reconstructions(lm, embedder, dataclasses.replace(cfg, scorer=scorer),
                                              inverted.records, seed=seed, label=label)
            scored[scorer] = stage.records
            seconds[f"inversion_{scorer}"] = inverted.timing["invert_s"] + stage.timing["score_s"]
    return scored, seconds


def tools_truth(verdicts: list[dict]) -> list[dict]:
    """The truth of --eval tools, per command as execution_truth's fields: success (and reward 1)
    where the domain's real tool accepted the command line; doing nothing runs no tool, so its
    reward is 0, no item is trivial, and beats_nothing is success. The tool's verdict kept."""
    truths = []
    for v in verdicts:
        accepted = v["tool_verdict"] == "accepted"
        truths.append({"success": accepted, "reward": float(accepted), "beats_reward": float(accepted),
                       "nothing_reward": 0.0, "beats_nothing": accepted, "trivial_item": False,
                       "gold_broken": False} | v)
    return truths


def execution_truth(cfg: isi.Config, team: Team, items: list[dict], commands: list[list[str]],
                    setups: dict | None = None):
    """Each item's commands in the item's own file system, beside the gold command (run afresh:
    time-relative golds age) and the do-nothing command `true`. Per item: the runs, and per
    command its truth: InterCode's reward and success; `beats_reward`, the reward of its output
    without bash's own complaints (an error message that shares a word with the gold output is
    not doing what was asked); `nothing_reward`; and `gold_broken` when the gold command's
    program is missing here (then any error message matches the gold's, and the item is out of
    the figures). `setups`: the items' file systems where they are not NL2Bash's (Evaluator's)."""
    def share_runs(share: list[dict], lists: list[list[str]]) -> list[tuple]:
        with nl2bash.Evaluator(share, setups, workers=isi.sandbox_workers(cfg, team)) as evaluator:
            nothing = evaluator.run_items(["true"] * len(share))
            flat = [(k, c) for k, commands_of_one in enumerate(lists) for c in commands_of_one]
            runs = evaluator.run_all([share[k]["group"] for k, _ in flat], [c for _, c in flat])
        out = []
        for k, gold in enumerate(evaluator.gold_runs):
            mine = [run for (j, _), run in zip(flat, runs) if j == k]
            nothing_reward = nl2bash.intercode_reward(gold, nothing[k])
            broken = isi.execution_verdict(gold) == "program not found"
            truths = []
            for run in mine:
                reward = nl2bash.intercode_reward(gold, run)
                beats = nl2bash.intercode_reward(gold, nl2bash.without_shell_complaints(run))
                truths.append({"success": nl2bash.is_success(reward), "reward": reward,
                               "beats_reward": beats, "nothing_reward": nothing_reward,
                               "beats_nothing": beats_nothing(beats, nothing_reward),
                               "trivial_item": nl2bash.is_success(nothing_reward),
                               "gold_broken": broken})
            out.append((mine, truths))
        return out
    return team.spread(lambda share, lists: team.together(lambda: share_runs(share, lists),
                                                          SandboxUnavailable), items, commands)


def executed(runs: list, checks: tuple, per_item: int) -> list[dict]:
    """The execution fields of candidates run (None: not run), items of `per_item` candidates
    (the sampled ones, then the greedy one): the loop's ladder and verdict, and the agreement
    group's size (the greedy command's counts the sampled ones and itself)."""
    sizes = []
    for j in range(0, len(runs), per_item):
        span = runs[j:j + per_item]
        sizes += isi.agreement_sizes(span[:-1]) + isi.agreement_sizes(span)[-1:]
    verdicts = ["unusable" if run is None else isi.execution_verdict(run) for run in runs]
    return [{"verdict": v, "passed": v == "passed", "agreement": size} | ladder
            for v, size, ladder in zip(verdicts, sizes, isi.ladder_values(runs, *checks))]


def audit_chunk(lm, embedder, cfg: isi.Config, sandbox, items: list[dict], chunk: int,
                plugins: list, setups: dict | None = None) -> list[dict]:
    """Every candidate of some items (K sampled and the greedy one, in that order per item) with
    every audited signal, and its execution truth against the gold command; with --eval tools
    (`sandbox` is then the domain's ToolChecker), the signals that need no file system and the
    tools' verdict."""
    on_tools = cfg.eval == "tools"
    seed, label, k = isi.stage_seed(cfg.seed, "audit", chunk), f"audit {chunk}", cfg.candidates
    tasks, n, timers = [isi.Task(item["query"], item.get("tool")) for item in items], len(items), {}
    started = time.perf_counter()
    # the greedy candidates ride in the sampled ones' passes (the sampled draw as they would alone)
    copies, greedy_tasks = [k] * n + [1] * n, [False] * n + [True] * n
    written = isi.generate_commands(lm, cfg, tasks + tasks, copies=copies, greedy=greedy_tasks, seed=seed,
                                    label=label, certainty=True)
    is_greedy = per_row(greedy_tasks, copies)
    timers["generate"], timers["certainty"] = time.perf_counter() - started, 0.0
    scored, inversion_s = audit_inversion(lm, embedder, cfg, written.records, greedy=is_greedy,
                                          seed=seed, label=label)
    timers |= inversion_s
    # per item: its K sampled candidates, then its greedy one
    order = [j for i in range(n) for j in [*range(i * k, (i + 1) * k), n * k + i]]
    records = [scored["embed"][j] for j in order]
    # coder and reviewer for every candidate with a command, usable or not
    scored_at = [i for i, r in enumerate(records) if r["command"]]
    coder, reviewer, timers["coder"], timers["reviewer"] = isi.coder_reviewer(
        lm, cfg, [isi.Task(records[i]["task"], records[i].get("tool")) for i in scored_at],
        [records[i]["command"] for i in scored_at],
        frozen_reviewer=cfg.judge == "frozen")
    likelihood = [isi.likelihood_fields(None, None) | {"coder_reviewer": None} for _ in records]
    for i, c, r in zip(scored_at, coder, reviewer):
        likelihood[i] = isi.likelihood_fields(c, r) | {"coder_reviewer": round(c + r, 5)}
    records = [r | fields for r, fields in zip(records, likelihood)]
    if on_tools:  # the truth is the tools' verdict; no command runs in a file system
        verdicts = lm.team.spread(sandbox.check, [r["command"] for r in records])  # the tool_* fields alone
        truth = [([], tools_truth(verdicts[j:j + k + 1])) for j in range(0, len(records), k + 1)]
        records = [r | {"verdict": v["tool_verdict"]} for r, v in zip(records, verdicts)]
        on_item = records
    else:
        runs, timers["execution"] = isi.run_commands(sandbox, records, lm.team)
        checks = isi.static_checks([r["command"] if r["usable"] else None for r in records])
        timers |= checks[2]
        records = [r | fields for r, fields in zip(records, executed(runs, checks[:2], k + 1))]
        started = time.perf_counter()
        truth = execution_truth(cfg, lm.team, items, [[r["command"] for r in records[j:j + k + 1]]
                                                      for j in range(0, len(records), k + 1)], setups)
        timers["execution_itemfs"] = time.perf_counter() - started
        item_runs = [run if r["usable"] else None
                     for r, run in zip(records, (run for runs_of_item, _ in truth for run in runs_of_item))]
        on_item = [r | fields for r, fields in zip(records, executed(item_runs, checks[:2], k + 1))]
    for signal in plugins:
        started = time.perf_counter()
        records = isi.plugin_values(signal, records, f"in audit chunk {chunk}")
        timers[signal.name] = time.perf_counter() - started
    rows, audited = [], columns(audited_signals(plugins, on_tools=on_tools))
    for j, (record, truths) in enumerate(zip(records, (t for _, item_truths in truth for t in item_truths))):
        item = items[j // (k + 1)]
        signals = {}
        for column in audited:
            source = (scored[column.scorer][order[j]] if column.scorer else on_item[j] if column.itemfs
                      else record)
            signals[column.name] = column_value(column.signal, source)
        rows.append({"item": item["id"], "fs": item["group"], "query": item["query"], "command": record["command"],
                     "output": record["output"], "greedy": is_greedy[order[j]], "usable": record["usable"],
                     "signals": signals} | truths | {"verdict": record["verdict"]})
    cost = {c.name: round(sum(timers[t] for t in c.timers) / len(rows), 5) for c in audited}
    cost = {"generate": round(timers["generate"] / len(rows), 5)} | cost
    return [r | {"cost": cost} for r in rows]


# ---------------------------------------------------------------------------------------------
# The audit from start to figures, resumable; and its figures again from its files
# ---------------------------------------------------------------------------------------------

def audit_settings(cfg: isi.Config, args: argparse.Namespace, shellcheck: bool) -> dict:
    """What makes an audit: a stopped one continues only with the same. One's own signals are
    named by their files, with their rules."""
    own = {"signals": {p.name: {"from": spec, "rule": p.rule} for spec, p in zip(args.signals, args.plugins)}}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in FLAGS and k not in RUN_ONLY
            and (k != "eval" or v != "nl2bash")} | {  # "eval" only off its default: older audits continue
        "adapter": None if args.adapter is None else str(Path(args.adapter).resolve()),
        "chunk_items": args.chunk_items, "shellcheck": shellcheck} | (own if args.plugins else {})


def figure_rules(settings: dict) -> tuple[dict, object]:
    """Each column's rule (the table's, and one's own signals' as the settings name them) and the
    rules' keeps, for the figures."""
    rules = column_rules(audited_signals([])) | {
        name: own["rule"] for name, own in settings.get("signals", {}).items()}
    return rules, rule_keeps(settings["threshold"], settings["shellcheck"])


def truth_again(audit_dir: Path, settings: dict, rows: list[dict]) -> list[dict]:
    """Every candidate executed again against its item's gold command, its truth fields replaced
    (its signals kept); the candidates file rewritten."""
    per_item = settings["candidates"] + 1
    wanted = {r["item"] for r in rows}
    setups = None
    if settings.get("eval") == "tools":  # the tools' verdict again, every candidate in one pass
        started = time.perf_counter()
        try:
            with ToolChecker(load_domain(settings["tasks_file"], settings["domain"])["tools"]) as checker:
                updated = [r | t for r, t in zip(rows, tools_truth(checker.check([r["command"] for r in rows])))]
        except SandboxUnavailable as err:
            raise UsageError(f"--truth-again: {err}") from None
        write_jsonl(audit_dir / "audit_candidates.jsonl", updated)
        print(f"put {len(updated)} candidates to the tools again in {time.perf_counter() - started:.1f}s", flush=True)
        return updated
    if settings.get("eval", "nl2bash") == "domain":
        domain = load_domain(settings["tasks_file"], settings["domain"])
        items, setups = [i for i in held_out_items(domain) if i["id"] in wanted], {
            "domain": (environment_script(domain), None)}
    else:
        try:
            items = [i for i in nl2bash.load_items() if i["id"] in wanted]
        except SandboxUnavailable as err:
            raise UsageError(f"--truth-again: {err}") from None
    if [i["id"] for i in items] != [r["item"] for r in rows[::per_item]]:
        raise UsageError(f"--truth-again: {audit_dir} does not hold {per_item} candidates per item in order")
    started, updated = time.perf_counter(), []
    for first in range(0, len(items), settings["chunk_items"]):
        chunk = items[first:first + settings["chunk_items"]]
        mine = rows[first * per_item:(first + len(chunk)) * per_item]
        try:
            truth = execution_truth(isi.Config(), Team(), chunk, [[r["command"] for r in mine[j:j + per_item]]
                                                                  for j in range(0, len(mine), per_item)], setups)
        except SandboxUnavailable as err:
            raise UsageError(f"--truth-again: {err}") from None
        updated += [r | t for r, t in zip(mine, (t for _, truths in truth for t in truths))]
        print(f"truth again: items {first + 1}-{first + len(chunk)} of {len(items)}", flush=True)
    write_jsonl(audit_dir / "audit_candidates.jsonl", updated)
    print(f"executed {len(updated)} candidates again in {time.perf_counter() - started:.1f}s", flush=True)
    return updated


def recompute_audit(audit_dir: Path, args: argparse.Namespace) -> dict:
    """`audit --from AUDIT_DIR`: the figures again from audit_candidates.jsonl (its truth
    executed again with --truth-again); with --against, each signal's change."""
    settings, rows, meta = read_audit(audit_dir)
    if args.truth_again:
        rows = truth_again(audit_dir, settings, rows)
    before = None if args.against is None else read_candidates(args.against)
    rules, keeps = figure_rules(settings)
    result = write_figures(audit_dir, rows, settings, meta, rules=rules, keeps=keeps, bootstrap=args.bootstrap,
                           margin=args.margin)
    report_audit(args.report_to, audit_dir, result, audit_table(result))
    if before is not None:
        write_changes(audit_dir, args.against, before, rows, bootstrap=args.bootstrap, seed=settings["seed"],
                      margin=args.margin)
    return result


def run_audit(cfg: isi.Config, args: argparse.Namespace, team: Team) -> dict:
    """`audit`: sample, score with every signal, execute; written chunk by chunk, then figures."""
    from support.cpu_products import cpu_identity
    shellcheck = static_analyser.shellcheck_available()
    if not shellcheck:
        print("shellcheck is not installed (apt-get install shellcheck): the ladder's "
              "shellcheck_clean level is reported unavailable", flush=True)
    audit_dir = Path(cfg.output) / (cfg.name or audit_name(cfg, args.adapter, args.plugins))
    domain, on_tools = load_domain(cfg.tasks_file, cfg.domain), cfg.eval == "tools"
    present = [tool for tool, there in installed(domain["tools"]).items() if there] if on_tools else []
    settings = audit_settings(cfg, args, shellcheck) | ({"tools": present} if on_tools else {})
    settings_path = audit_dir / "audit_settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise UsageError(f"{audit_dir} holds an audit with other settings ({settings_path}); "
                         f"choose another --name or --output")
    if on_tools and len(present) < len(domain["tools"]):
        missing = [tool for tool in domain["tools"] if tool not in present]
        if not present:
            raise UsageError(f"audit --eval tools: none of the {isi.domain_label(cfg)} domain's tools is installed "
                             f"here ({', '.join(missing)}; make install installs the Debian ones)")
        print(f"note: not installed here, so their tasks are left out: {', '.join(missing)}", flush=True)
    items, setups = audited_items(cfg, present)
    per_item = cfg.candidates + 1
    path = audit_dir / "audit_candidates.jsonl"
    rows = audited_so_far(path, items, per_item)
    started = time.perf_counter()
    try:
        sandbox = team.together(lambda: ToolChecker(domain["tools"], workers=isi.sandbox_workers(cfg, team))
                                if on_tools else Sandbox({"domain": (environment_script(domain), None)},
                                                         workers=isi.sandbox_workers(cfg, team)),
                                SandboxUnavailable)
    except SandboxUnavailable as err:
        what = "puts every candidate to the domain's tools" if on_tools else "executes every candidate"
        raise UsageError(f"audit {what} in the sandbox: {err}") from None
    with sandbox:
        lock = team.together(lambda: hold_run_directory(audit_dir) if team.main else None)
        try:
            if team.main:
                write_json(settings_path, settings)
            lm, embedder = load_models(dataclasses.replace(cfg, scorer="embed"), team)
            if args.adapter is not None:
                load_adapter(lm, Path(args.adapter))
            done = len(rows) // per_item
            if done:
                print(f"continuing {audit_dir}: {done} of {len(items)} items done", flush=True)
            for first in range(done, len(items), args.chunk_items):
                chunk_started = time.perf_counter()
                chunk = items[first:first + args.chunk_items]
                rows += audit_chunk(lm, embedder, cfg, sandbox, chunk, first // args.chunk_items, args.plugins,
                                    setups)
                if team.main:
                    write_jsonl(path, rows)
                print(f"audit: items {first + 1}-{first + len(chunk)} of {len(items)}, "
                      f"{len(chunk) * per_item} candidates in {time.perf_counter() - chunk_started:.1f}s",
                      flush=True)
            meta = {"machine": cpu_identity(), "compute": compute_record(lm),
                    "wall_s": round(time.perf_counter() - started, 1), "complete": True}
            rules, keeps = figure_rules(settings)
            if not team.main:
                return {}
            result = write_figures(audit_dir, rows, settings, meta, rules=rules, keeps=keeps,
                                   bootstrap=args.bootstrap, margin=args.margin)
            report_audit(cfg.report_to, audit_dir, result, audit_table(result))
            return result
        finally:
            if lock is not None:
                lock.close()


def main(argv: list[str], join=join_team) -> None:
    """The audit's command line. `join(cfg)` makes this process one of its team (the caller's,
    which reports errors once and leaves the team)."""
    args = parse_args(argv)
    if args.from_dir is not None:
        recompute_audit(Path(args.from_dir), args)
        return
    cfg = audit_config(args)
    run_audit(cfg, args, join(cfg))
