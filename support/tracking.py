"""Watching a run where researchers already look: `--report-to tensorboard` (and `wandb`, offline
unless WANDB_MODE says otherwise). The loop and the audit hand over the figures they already
compute; nothing here computes a figure of its own.

What is written, and when (docs/tracking.md):
- a run: its configuration once (as hyperparameters and as text), at step 0 the untrained model's
  probe and evaluation figures, and per completed cycle, at step = the cycle, every number of the
  cycle's progress.json entry under a tag named by its path (`probe/mean_score`,
  `after/health/copy_rate`, `eval_domain/success_rate`, `timing/cycle_s`), the training loss per
  optimizer step (`train/loss_per_step`, step = optimizer steps since the run began), and a text
  table of a few fresh tasks with their commands and reconstructions;
- an audit: each signal's figures (`auroc/<signal>`, their intervals as `auroc_low`/`auroc_high`)
  and the audit's own (greedy and oracle success) at step 0, and its ranking as text.

A cycle's events are written after its progress.json, all at once: a run stopped mid-cycle has
written nothing of that cycle, so its resume writes each cycle's step once. Event files live in the
run (or audit) directory itself, so `tensorboard --logdir output/extended_run` shows each run under
its own name. Only the main process of a team writes.

The rest may call: REPORTERS, check_reporter, open_reporter, report_cycle, report_audit, cycle_figures,
initial_figures, audit_figures_flat, sample_table.
"""
import importlib.util
import json
import os
from pathlib import Path

from support import UsageError

REPORTERS = ["none", "tensorboard", "wandb"]
# sections of a cycle's progress.json entry that hold figures (the rest is bookkeeping)
CYCLE_SECTIONS = ("before", "after", "probe", "training", "eval", "eval_domain", "timing")
INITIAL_SECTIONS = {"probe_initial": "probe", "eval_initial": "eval", "eval_domain_initial": "eval_domain"}
TABLE_ROWS = 8


def check_reporter(kind: str) -> None:
    """One line, before anything loads, where the package a reporter needs is missing."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"--report-to {kind} needs the {package} package, which is not installed "
                         f"(pip install {package}{'; make install installs it' if kind == 'tensorboard' else ''})")


def flat_numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every number of a nested dict, keyed by its path joined with '/'; booleans as 0/1; lists,
    strings and None left out."""
    out = {}
    for key, value in (tree or {}).items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_numbers(value, tag + "/")
        elif isinstance(value, bool):
            out[tag] = float(value)
        elif isinstance(value, (int, float)):
            out[tag] = float(value)
    return out


def cycle_figures(entry: dict) -> dict[str, float]:
    """A completed cycle's figures, from its progress.json entry."""
    figures = {}
    for section in CYCLE_SECTIONS:
        if isinstance(entry.get(section), dict):
            figures |= flat_numbers(entry[section], section + "/")
    figures["improvement"] = float(entry["improvement"])
    figures["collapsed"] = float(bool(entry.get("collapse")))
    return figures


def initial_figures(history: dict) -> dict[str, float]:
    """Step 0: the untrained model's probe and evaluations, under the tags the cycles use."""
    figures = {}
    for key, section in INITIAL_SECTIONS.items():
        if isinstance(history.get(key), dict):
            figures |= flat_numbers(history[key], section + "/")
    return figures


def audit_figures_flat(figures: dict) -> dict[str, float]:
    """An audit's figures: per signal `figure/signal`, an interval as `figure_low/signal` and
    `figure_high/signal`; the audit's own numbers (greedy, oracle, random top-1) by their name."""
    out = {}
    for signal, values in figures.get("signals", {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{name}/{signal}"] = float(value)
            elif name.endswith("_ci") and isinstance(value, list) and len(value) == 2:
                out[f"{name[:-3]}_low/{signal}"], out[f"{name[:-3]}_high/{signal}"] = map(float, value)
    for name, value in figures.items():
        if name != "signals" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"audit/{name}"] = float(value)
        elif name.endswith("_ci") and isinstance(value, list) and len(value) == 2:
            out[f"audit/{name[:-3]}_low"], out[f"audit/{name[:-3]}_high"] = map(float, value)
    return out


def cell(text, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def sample_table(records: list[dict], candidates: int, rows: int = TABLE_ROWS) -> str:
    """A markdown table of the first candidate of the first `rows` tasks of a batch: the task, the
    command, the model's reconstruction of the task, and the score; collapse is seen in it."""
    picked = records[::max(candidates, 1)][:rows]
    lines = ["| task | command | reconstruction | score |", "| --- | --- | --- | --- |"]
    lines += [f"| {cell(r.get('task', ''))} | {cell(r.get('command', ''))} | {cell(r.get('reconstruction', ''))} "
              f"| {float(r.get('score') or 0):.3f} |" for r in picked]
    return "\n".join(lines)


def hyperparameters(config: dict) -> dict:
    """The configuration as TensorBoard's hparams plugin takes it: numbers, strings and booleans."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class Reporter:
    """Writes nothing: `--report-to none`, and every process but a team's main one. `writes`: whether
    a reporter writes anything (a cycle's figures are computed only for one that does)."""
    writes = False

    def start(self, config: dict) -> None:
        pass

    def figures(self, figures: dict[str, float], step: int) -> None:
        pass

    def losses(self, losses: list[float], first_step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Reporter):
    """Event files in `directory`; `replace`: TensorBoard hides what earlier files of the directory
    hold (an audit written again replaces its figures)."""
    writes = True

    def __init__(self, directory: Path, replace: bool = False):
        self.directory, self.replace, self.opened = directory, replace, None

    @property
    def writer(self):
        """Opened at the first write: a run stopped before it leaves no event file."""
        if self.opened is None:
            from torch.utils.tensorboard import SummaryWriter
            self.opened = SummaryWriter(log_dir=str(self.directory), flush_secs=3600,  # flushed per cycle
                                        purge_step=0 if self.replace else None)
        return self.opened

    def start(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams(hyperparameters(config), {"probe/mean_score": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def figures(self, figures: dict[str, float], step: int) -> None:
        for tag, value in figures.items():
            self.writer.add_scalar(tag, value, step)

    def losses(self, losses: list[float], first_step: int) -> None:
        for i, loss in enumerate(losses):
            self.writer.add_scalar("train/loss_per_step", loss, first_step + i + 1)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.opened is not None:
            self.opened.flush()

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


class WandB(Reporter):
    """Offline unless WANDB_MODE is set; the run's id is its directory's name, so a resume continues
    the same run."""
    writes = True

    def __init__(self, directory: Path, resumed: bool):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(dir=str(directory), project="intrinsic-self-improvement", name=directory.name,
                              id=directory.name, resume="allow" if resumed else None,
                              mode=os.environ.get("WANDB_MODE", "offline"))
        self.run.define_metric("train/optimizer_step")
        self.run.define_metric("train/loss_per_step", step_metric="train/optimizer_step")
        self.run.define_metric("cycle")
        self.run.define_metric("*", step_metric="cycle")

    def start(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def figures(self, figures: dict[str, float], step: int) -> None:
        self.run.log(figures | {"cycle": step})

    def losses(self, losses: list[float], first_step: int) -> None:
        for i, loss in enumerate(losses):
            self.run.log({"train/loss_per_step": loss, "train/optimizer_step": first_step + i + 1})

    def text(self, tag: str, text: str, step: int) -> None:
        rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()[2:]]
        if text.startswith("| ") and rows:
            header = [c.strip() for c in text.splitlines()[0].strip("|").split(" | ")]
            self.run.log({tag: self.wandb.Table(columns=header, data=rows), "cycle": step})

    def close(self) -> None:
        self.run.finish()


def open_reporter(kind: str, directory: Path, *, main: bool, resumed: bool = False,
                  replace: bool = False) -> Reporter:
    """The reporter a run or an audit writes to; a silent one for `none` and off the main process."""
    if kind == "none" or not main:
        return Reporter()
    check_reporter(kind)
    return TensorBoard(directory, replace) if kind == "tensorboard" else WandB(directory, resumed)


def report_cycle(reporter: Reporter, history: dict, entry: dict, fresh: list[dict], candidates: int) -> None:
    """A completed cycle (already in `history` and progress.json): its figures at step = the cycle,
    its training loss per optimizer step, a sample of its fresh batch; with cycle 1, the
    configuration and the untrained model's figures (step 0), so that a run stopped before its
    first cycle ends has written nothing. Nothing is computed for a reporter that writes nothing."""
    if not reporter.writes:
        return
    cycle = entry["cycle"]
    if cycle == 1:
        reporter.start(history["config"])
        reporter.figures(initial_figures(history), 0)
    reporter.figures(cycle_figures(entry), cycle)
    steps_before = sum(c["training"].get("steps", 0) for c in history["cycles"] if c["cycle"] < cycle)
    reporter.losses(entry["training"].get("loss_per_step", []), steps_before)
    reporter.text("fresh_batch", sample_table(fresh, candidates), cycle)
    reporter.flush()


def report_audit(kind: str, audit_dir: Path, result: dict, table: str) -> None:
    """An audit's figures at step 0 and its printed table as text, replacing what an earlier
    writing of the same audit left (TensorBoard)."""
    reporter = open_reporter(kind, audit_dir, main=True, replace=True)
    try:
        reporter.figures(audit_figures_flat(result), 0)
        reporter.text("audit", "```\n" + table + "\n```", 0)
    finally:
        reporter.close()
