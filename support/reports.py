"""Reports: the stage lines a run prints, a completed cycle's bookkeeping (its place in the
history, progress.json, its closing lines, the run's last), progress.png,
self_improvement_results.json, and `compare`'s table and plot (runs side by side).

The rest may call: log_stage, tools_line, duration, plot_progress, write_results, compare_runs,
log_training, log_evaluation, record_cycle, log_cycle_end, log_done, score_correlations, pooled_correlations, curve,
eval_figures, figures_over, experiment_kind.
"""
import io
import re
import json
from datetime import datetime, timezone
from pathlib import Path

from support import UsageError
from support import nl2bash
from support.run_directory import read_jsonl, read_progress, write_bytes, write_json


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


def log_stage(label: str, stage, summary: dict) -> None:
    t = stage.timing
    print(f"  {label:<7} {summary['accepted']:>3}/{summary['total_generated']} accepted, mean score "
          f"{summary['mean_score']:.3f}, unusable {summary['unusable_commands']} | generate {t['generate_s']:.1f}s "
          f"({tokens_per_s(t['generate_tokens'], t['generate_s'])} tok/s), invert {t['invert_s']:.1f}s "
          f"({tokens_per_s(t['invert_tokens'], t['invert_s'])} tok/s), score {t['score_s']:.1f}s"
          + (f", likelihood {summary['mean_likelihood']:.3f} ({t['likelihood_s']:.1f}s)"
             if "mean_likelihood" in summary and "likelihood_s" in t else
             f", likelihood of {t['likelihood_scored']} ({t['likelihood_s']:.1f}s)" if "likelihood_s" in t else "")
          + (f"; execution passed {summary['execution_pass_rate']:.2f}, agreed {summary['agreement_rate']:.2f}"
             + (f", ladder {summary['mean_ladder']:.2f}" if "mean_ladder" in summary else "")
             + f" ({t['execute_s']:.1f}s)" if "execute_s" in t else "")
          + (f"; {tools_line(summary)} ({t['tools_s']:.1f}s)" if "tools_s" in t else ""),
          flush=True)


def tools_line(summary: dict) -> str:
    """What the domain's real tools made of a batch: 'tools accepted 0.12 (0.40 of 30 run)'."""
    of_run = summary["tools_accepted_of_run"]
    return (f"tools accepted {summary['tools_accepted_rate']:.2f} "
            + (f"({of_run:.2f} of {summary['tools_run']} run)" if of_run is not None else "(none run)"))


def log_training(training: dict) -> None:
    if training["skipped"]:
        print("  train   nothing selected: training skipped", flush=True)
    else:
        print(f"  train   {training['pairs']} pairs ({training['selected']} selected), {training['steps']} steps, "
              f"command-token loss {training['loss_first']:.3f} -> {training['loss_last']:.3f} | "
              f"{training['train_s']:.1f}s ({training['train_tokens_per_s']} tok/s)", flush=True)


def log_evaluation(summary: dict, label: str = "eval") -> None:
    timing = summary["timing"]
    what = "NL2Bash" if label == "eval" else "held-out tasks"
    print(f"  {label:<7} {what} n={summary['n']}: success {summary['success_rate']:.3f}, reward "
          f"{summary['mean_reward']:.3f}, NLC2CMD {summary['nlc2cmd']:.3f}, exact "
          f"{summary['exact_match']:.3f}; spearman(intrinsic, success) {summary['spearman_score_success']}"
          f" | generate {timing['generate_s']:.1f}s, execute {timing['execute_s']:.1f}s, judge "
          f"{timing['judge_s']:.1f}s", flush=True)


def rounded(value: float | None, places: int = 4) -> float | None:
    return None if value is None else round(value, places)


def score_correlations(records: list[dict]) -> dict:
    """Spearman between the intrinsic score of evaluated commands and their execution success
    and reward."""
    scores = [r["score"] for r in records]
    return {"spearman_score_success": rounded(nl2bash.spearman(scores, [float(r["success"]) for r in records])),
            "spearman_score_reward": rounded(nl2bash.spearman(scores, [r["reward"] for r in records]))}


def pooled_correlations(records: list[dict]) -> dict:
    """score_correlations over every evaluated command of a run."""
    if not records:
        return {}
    return {"eval_commands": len(records)} | {f"eval_{k}": v for k, v in score_correlations(records).items()}


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
               **({"eval_domain_success_initial": (history.get("eval_domain_initial") or {}).get("success_rate"),
                   "eval_domain_success_final": (last.get("eval_domain") or {}).get("success_rate")}
                  if "eval_domain" in last else {}),
               **pooled_correlations(evaluated),
               "total_generated": history["total_generated"], "total_accepted": history["total_accepted"],
               # Goodhart's mark: the probe's signal score rose while its execution pass rate fell
               "signal_up_execution_down_cycles": [c["cycle"] for c in history["cycles"]
                                                   if c.get("signal_up_execution_down")],
               "collapsed_cycles": [c["cycle"] for c in history["cycles"] if c.get("collapse")],
               "wall_s_this_invocation": None if wall_s is None else round(wall_s, 1),
               "config": history["config"]}
    write_json(run_dir / "self_improvement_results.json", results)
    return results


def record_cycle(run_dir: Path, history: dict, entry: dict, processes: int, main: bool) -> dict:
    """A completed cycle into the run's history (its totals, how many processes ran it) and, by the
    main process, the plot and progress.json, last: it marks the cycle as done. Returns the
    progress."""
    history["cycles"].append(entry)
    history["total_generated"] += entry["before"]["total_generated"]
    history["total_accepted"] += entry["before"]["accepted"]
    history["compute"]["processes"].append(processes)
    progress = {"last_completed_cycle": entry["cycle"], "timestamp": datetime.now(timezone.utc).isoformat(),
                "history": history}
    if main:
        plot_progress(history, run_dir / "progress.png")
        write_json(run_dir / "progress.json", progress)
    return progress


def log_cycle_end(entry: dict, signal: str, cycles: int, stop_on_collapse: bool, cycle_s: float,
                  so_far_s: float) -> bool:
    """A cycle's last lines: Goodhart's mark, a collapse, the time so far and left. True where
    --stop-on-collapse stops the run after this cycle."""
    cycle, collapse, left = entry["cycle"], entry["collapse"], cycles - entry["cycle"]
    if entry["signal_up_execution_down"]:
        print(f"  warning: the probe's {signal} score rose while its execution pass rate fell", flush=True)
    if collapse:
        print(f"  the fresh batch has collapsed: {', '.join(collapse)}", flush=True)
    if collapse and stop_on_collapse and left:
        print(f"stopped after cycle {cycle} of {cycles} (--stop-on-collapse: {', '.join(collapse)}); "
              f"to go on anyway: the same command with --resume and without --stop-on-collapse", flush=True)
        return True
    print(f"  cycle {cycle} done in {cycle_s:.1f}s | {duration(so_far_s)} so far"
          + (f", about {duration(cycle_s * left)} left at this cycle's pace" if left else ""), flush=True)
    return False


def log_done(run_dir: Path, history: dict, wall_s: float, probed: bool) -> None:
    """The results file and the run's last line."""
    results = write_results(run_dir, history, wall_s=wall_s)
    probe = (f"probe score {results['probe_initial']} -> {results['probe_final']} (frozen judge "
             f"{results['frozen_probe_initial']} -> {results['frozen_probe_final']}), " if probed else "no probe, ")
    print(f"done: {probe}batch score {results['before_first']} -> {results['after_last']}; {run_dir}", flush=True)


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
            ("exact match", ("eval", "exact_match"), "eval_initial"),
            ("held-out tasks: success", ("eval_domain", "success_rate"), "eval_domain_initial"),
            ("held-out tasks: mean reward", ("eval_domain", "mean_reward"), "eval_domain_initial"),
            ("probe: the real tools accept", ("probe", "tools_accepted_rate"), "probe_initial"),
            ("fresh batch: the real tools accept", ("after", "tools_accepted_rate"), None)]),
        (axes[1][0], "command-token training loss", [
            ("first step", ("training", "loss_first"), None), ("last step", ("training", "loss_last"), None),
            ("mean", ("training", "loss_mean"), None)]),
        (axes[1][1], "health of the after batch", [
            ("distinct-1", ("after", "health", "distinct_1"), None),
            ("distinct-2", ("after", "health", "distinct_2"), None),
            ("duplicate rate", ("after", "health", "duplicate_rate"), None),
            ("copy rate", ("after", "health", "copy_rate"), None),
            ("restated tasks", ("after", "health", "restate_rate"), None),
            ("no command", ("after", "health", "no_command_rate"), None)]),
        (axes[1][2], "command length and unusable outputs (after batch)", [
            ("mean command tokens", ("after", "health", "mean_command_tokens"), None)]),
    ]
    for ax, title, lines in panels:
        drawn = []
        for label, keys, initial in lines:
            xs, ys = curve(history, *keys, initial=initial)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
                drawn += ys
        if ax is axes[0][2] and drawn:  # shares (NLC2CMD down to -1): a flat 0 shown as 0 of a visible range
            ax.set_ylim(min(-0.02, min(drawn) - 0.02), max(0.25, max(drawn) * 1.1))
        ax.set_title(title)
        ax.set_xlabel("cycle")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    marked = [c["cycle"] for c in history["cycles"] if c.get("signal_up_execution_down")]
    for k, cycle in enumerate(marked):  # Goodhart's mark: the signal's score up, execution down
        axes[0][0].axvline(cycle, color="tab:red", linestyle=":", alpha=0.6,
                           label=None if k else "probe: signal up, execution pass rate down")
    for k, cycle in enumerate(c["cycle"] for c in history["cycles"] if c.get("collapse")):
        axes[1][1].axvspan(cycle - 0.4, cycle + 0.4, color="tab:red", alpha=0.12,
                           label=None if k else "collapsed (COLLAPSE)")
    for ax in (axes[0][0], axes[1][1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    xs = [c["cycle"] for c in history["cycles"]]
    unusable = [c["after"]["unusable_commands"] / max(1, c["after"]["total_generated"]) for c in history["cycles"]]
    twin = axes[1][2].twinx()
    twin.plot(xs, unusable, color="tab:red", marker="s", label="unusable share")
    twin.set_ylim(0, 1)
    twin.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{history['config']['model']} | {history['config']['scorer']} scorer | select "
                 f"{history['config'].get('select', 'threshold')} | seed {history['config']['seed']}")
    image = io.BytesIO()
    fig.savefig(image, dpi=80, format="png")
    plt.close(fig)
    write_bytes(path, image.getvalue())


def load_run(run_dir: str) -> dict:
    """A run's progress.json for compare; a missing or damaged one is a one-line error."""
    path = Path(run_dir) / "progress.json"
    if not path.is_file():
        raise UsageError(f"compare: {run_dir} holds no progress.json")
    return read_progress(path, what="compare: ", then="")


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def fmt(value) -> str:
    """A table cell: 3 decimals, "-" for what a run did not measure."""
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


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
    support.nl2bash results) over the items of some file systems; {} when none is there."""
    chosen = [r for r in records if int(r["id"].split("-")[0].removeprefix("fs")) in groups]
    return nl2bash.aggregate(chosen) if chosen else {}


def experiment_kind(config: dict) -> dict:
    """The settings that tell apart the kinds of runs compare groups (older runs lack the newer
    ones: they ran with what are now the defaults)."""
    return {"signal": config.get("signal", "inversion"), "train-from": config.get("train_from", "previous"),
            **{key: config.get(key) for key in ("select", "data", "judge", "scorer")}}


def evaluated_items(path: Path, groups: tuple[int, ...] | None) -> dict:
    """{item id: (success, reward)} of an eval_cycle_N.jsonl, over `groups` when given."""
    return {r["id"]: (bool(r["success"]), float(r["reward"])) for r in read_jsonl(path)
            if groups is None or int(r["id"].split("-")[0].removeprefix("fs")) in groups}


def baseline_lines(runs: dict, groups_of_runs: dict, baseline: str | None,
                   groups: tuple[int, ...] | None, key: str = "eval") -> list[str]:
    """Each kind of run (its seeds' final evaluations) against the untrained model on the same
    items: <key>_cycle_0.jsonl of --baseline, or of the first run that has one (key: eval,
    NL2Bash; eval_domain, the domain's held-out tasks)."""
    from support.statistics import against_baseline
    candidates = [baseline] if baseline is not None else list(runs)
    first = f"{key}_cycle_0.jsonl"
    path = next((Path(d) / first for d in candidates if (Path(d) / first).is_file()), None)
    if path is None:
        if baseline is not None and key == "eval":
            raise UsageError(f"compare: --baseline {baseline} holds no eval_cycle_0.jsonl (the untrained model's "
                             f"evaluation)")
        return []
    base = evaluated_items(path, groups)
    what = "NL2Bash" if key == "eval" else "the domain's held-out tasks"
    lines = ["", f"{what}: against the untrained model ({path}), final evaluations; per item the mean over seeds; "
             "95% bootstrap intervals over items (paired for the change); McNemar's exact test per seed "
             "(items only the arm solves / only the untrained model solves, p):"]
    successes = {}  # per kind of run: {item: success, the mean over its seeds}, for the oracle's share
    for kind_key, dirs in groups_of_runs.items():
        finals = [Path(d) / f"{key}_cycle_{len(runs[d]['cycles'])}.jsonl" for d in dirs if runs[d]["cycles"]]
        if not finals or not all(f.is_file() for f in finals):
            continue
        try:
            seed_runs = [evaluated_items(p, groups) for p in finals]
            f = against_baseline(seed_runs, base)
        except ValueError:
            continue
        kind = " ".join(f"{name}={value}" for name, value in experiment_kind(json.loads(kind_key)).items())
        successes[kind] = f["per_item_success"]
        tests = ", ".join(f"{t['only_treated']}/{t['only_control']} p={t['p']:.2f}" for t in f["mcnemar"])
        lines.append(
            f"  {kind} ({f['seeds']} seeds, {f['items']} items): success {f['success']:.3f} "
            f"[{f['success_ci'][0]:.3f}, {f['success_ci'][1]:.3f}] against {f['success_baseline']:.3f}, change "
            f"{f['success_change']:+.3f} [{f['success_change_ci'][0]:+.3f}, {f['success_change_ci'][1]:+.3f}]; "
            f"reward {f['reward']:.3f} against {f['reward_baseline']:.3f}, change {f['reward_change']:+.3f} "
            f"[{f['reward_change_ci'][0]:+.3f}, {f['reward_change_ci'][1]:+.3f}]; McNemar {tests}")
    return lines + oracle_share_lines(successes, base)


def oracle_share_lines(successes: dict, base: dict) -> list[str]:
    """Where an oracle arm (--select oracle or oracle-sized, which use labels) is among the runs:
    each label-free kind's share of that oracle's lift in success over the untrained model, on the
    items all share; for each oracle that is there once."""
    lines = []
    for select in ("oracle", "oracle-sized"):
        oracles = [kind for kind in successes if re.search(rf"select={select}(?![-\w])", kind)]
        if len(oracles) == 1:
            lines += share_lines(successes, base, oracles[0])
    return lines


def share_lines(successes: dict, base: dict, ceiling: str) -> list[str]:
    """Each label-free kind's share of the `ceiling` kind's lift."""
    from support.statistics import share_of_lift
    oracle = successes[ceiling]
    lines = [f"share of the oracle's lift recovered (success; the oracle, {ceiling}, uses labels; "
             "95% bootstrap interval over items):"]
    for kind, arm in successes.items():
        if re.search(r"select=oracle", kind):
            continue
        items = sorted(set(arm) & set(oracle) & set(base))
        f = share_of_lift([arm[i] for i in items], [oracle[i] for i in items], [float(base[i][0]) for i in items])
        if f["share"] is None:
            lines.append(f"  {kind}: none to share (the oracle's lift is {f['oracle_lift']:+.3f}: no selection "
                         f"lifted success in this setting)")
        else:
            interval = "unstable" if f["share_ci"] is None else f"[{f['share_ci'][0]:.2f}, {f['share_ci'][1]:.2f}]"
            lines.append(f"  {kind}: {f['share']:.2f} {interval} of the oracle's lift {f['oracle_lift']:+.3f} "
                         f"({len(items)} items)")
    return lines


def probe_tool_verdicts(run_dir: Path, cycle: int) -> dict | None:
    """The probe's tools verdicts at a cycle, by task: accepted or not (None where not judged)."""
    path = run_dir / ("probe_cycle_0.jsonl" if cycle == 0 else f"examples_cycle_{cycle}.jsonl")
    if not path.is_file():
        return None
    rows = [r for r in read_jsonl(path) if cycle == 0 or r.get("stage") == "probe"]
    if not rows or "tool_verdict" not in rows[0]:
        return None
    return {r["task"]: r["tool_verdict"] == "accepted" for r in rows}


def tools_lines(runs: dict) -> list[str]:
    """Per run judged by the domain's tools: the share of the probe's commands they accept,
    untrained against the last cycle, paired on the probe's tasks (the same every cycle), with
    the paired interval and McNemar's exact test."""
    from support import statistics
    lines = []
    for d, h in runs.items():
        start, end = probe_tool_verdicts(Path(d), 0), probe_tool_verdicts(Path(d), len(h["cycles"]))
        if not start or not end or set(start) != set(end):
            continue
        tasks = sorted(start)
        before, after = [start[t] for t in tasks], [end[t] for t in tasks]
        change, ci = statistics.paired_difference(after, before)
        test = statistics.mcnemar_exact(after, before)
        if not lines:
            lines += ["", "the real tools accept the probe's commands, untrained -> last cycle (paired on the probe's "
                          "tasks; McNemar: only last / only untrained):"]
        lines.append(f"  {Path(d).name}: {sum(before) / len(tasks):.3f} -> {sum(after) / len(tasks):.3f} of "
                     f"{len(tasks)} tasks, change {change:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], McNemar "
                     f"{test['only_treated']}/{test['only_control']}, p = {test['p']:.2f}")
    return lines


def compare_runs(run_dirs: list[str], plot_path: Path, groups: tuple[int, ...] | None = None,
                 baseline: str | None = None) -> str:
    """A table of runs side by side, and groups of runs that differ only by seed, averaged. With
    `groups`, the NL2Bash figures are over the items of those file systems only. Where the runs
    were evaluated, each kind of run against the untrained model (`baseline`'s eval_cycle_0.jsonl,
    or the first run's that has one), paired on the same items."""
    runs = {d: load_run(d)["history"] for d in run_dirs}
    columns = ["run", "cycles", "probe 0->N", "frozen probe N", "after N", "accept N", "exec pass N", "copy N",
               "eval success 0->N", "eval reward 0->N", "NLC2CMD 0->N"]
    held_out = any("eval_domain_initial" in h or any("eval_domain" in c for c in h["cycles"]) for h in runs.values())
    if held_out:  # --eval domain: the domain's held-out tasks
        columns += ["held-out success 0->N", "held-out reward 0->N"]
    tooled = any("tools_accepted_rate" in h.get("probe_initial", {}) for h in runs.values())
    if tooled:  # --eval tools: what the domain's real tools accept, of the probe's commands
        columns += ["tools accept probe 0->N"]
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
        if held_out:
            start, end = h.get("eval_domain_initial") or {}, last.get("eval_domain") or {}
            rows[-1] += [f"{fmt(start.get(k, '-'))} -> {fmt(end.get(k, '-'))}" if start or end else "-"
                         for k in ("success_rate", "mean_reward")]
        if tooled:
            rows[-1].append(f"{fmt(h.get('probe_initial', {}).get('tools_accepted_rate', '-'))} -> "
                            f"{fmt(probe.get('tools_accepted_rate', '-'))}")
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
            # what every seed's last cycle has (no probe with --probe-tasks 0, no execution without a sandbox)
            parts = [f"{label} {spread([c[stage][key] for c in last])}"
                     for label, stage, key in (("probe", "probe", "mean_score"),
                                               ("frozen probe", "probe", "frozen_mean_score"),
                                               ("exec pass", "after", "execution_pass_rate"))
                     if all((c.get(stage) or {}).get(key) is not None for c in last)]
            if all(finals[d] for d in done):
                parts += [f"eval {name} {spread([finals[d][k] for d in done])}" for name, k in
                          (("success", "success_rate"), ("reward", "mean_reward"), ("NLC2CMD", "nlc2cmd"))]
            kind = " ".join(f"{name}={value}" for name, value in experiment_kind(json.loads(key)).items())
            lines.append(f"  {kind} ({len(dirs)} seeds): " + ", ".join(parts))
    lines += baseline_lines(runs, groups_of_runs, baseline, groups)
    lines += baseline_lines(runs, groups_of_runs, baseline, None, key="eval_domain")
    if tooled:
        lines += tools_lines(runs)

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
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:  # no run measured it (no probe with --probe-tasks 0)
            ax.text(0.5, 0.5, "not measured in these runs", ha="center", va="center", transform=ax.transAxes)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=80)
    plt.close(fig)
    return "\n".join(lines + ["", f"plot: {plot_path}"])
