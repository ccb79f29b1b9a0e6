"""The audit's figures: how well each label-free signal picks, among the candidates a model
writes, the ones that work when executed. Pure functions over the candidate records of
audit_candidates.jsonl, then the table and the plot.

A record is one candidate: item, fs, query, command, greedy, usable, trivial_item (doing nothing
already succeeds on the item), signals {name: number or None}, success, reward, beats_nothing.
Figures are over the K sampled candidates of each item (the greedy command is reported beside
them); intervals are 95% percentile bootstraps over items (all candidates of a drawn item come
with it), the same draws for every signal. A signal that abstains on a candidate (None) ranks it
below every candidate it scored.

Each signal's own selection rule (what it would keep of one item's candidates, as the loop
selects) comes from the signal table of intrinsic_self_improvement.py, as a function the caller
passes: the figures do not know the signals.

The rest may call: auroc, beats_nothing, scored, auroc_draws, spearman_draws, item_draws, interval, top1_values,
audit_figures, audit_table, plot_audit, paired_changes, changes_table, BEATS_NOTHING_MARGIN.
"""
import math
from pathlib import Path

import numpy as np

# A candidate beats doing nothing when its reward exceeds the do-nothing command's on the same item
# by at least this. The reward's output part is 0.33 x the TF-IDF cosine of the outputs, rounded to
# 0.01: an error message that shares a word with the gold output ("bash: x: command not found"
# against a listing) already scores 0.01-0.02 above silence. 0.05 asks for an output about 15%
# like the gold's, or for the file-system change the gold made (that part moves by 0.28).
BEATS_NOTHING_MARGIN = 0.05

# An item bootstrap says nothing about a truth whose positives sit on a few items (drawn or not,
# the figure hardly moves): below this many items with a positive, its intervals are not given.
MIN_POSITIVE_ITEMS = 5

# --- statistics -------------------------------------------------------------------------------

def ranked(values) -> np.ndarray:
    """Signal values as floats, an abstention (None) below every number."""
    return np.array([-np.inf if v is None else float(v) for v in values], dtype=float)


def auroc_draws(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) of `scores` for boolean `labels`, once per row of `weights`
    (draws x candidates: how often each candidate is in a draw); NaN where a draw has no positive
    or no negative. Weighted Mann-Whitney over tie groups, all draws at once."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order].astype(bool)
    w = weights[:, order].astype(float)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positive = np.add.reduceat(w * sorted_labels, starts, axis=1)
    negative = np.add.reduceat(w * ~sorted_labels, starts, axis=1)
    below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(1) * negative.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (positive * (below + 0.5 * negative)).sum(1) / pairs, np.nan)


def auroc(scores, labels) -> float | None:
    """AUROC of scores for boolean labels; None without both classes."""
    value = auroc_draws(ranked(scores), np.asarray(labels, bool), np.ones((1, len(labels))))[0]
    return None if math.isnan(value) else float(value)


def spearman_draws(xs: np.ndarray, ys: np.ndarray, draws: list[np.ndarray]) -> np.ndarray:
    """Spearman's rho of xs and ys over each draw (an index array, repeats allowed); NaN where
    either side is constant."""
    from scipy.stats import rankdata
    values = []
    for index in draws:
        rx, ry = rankdata(xs[index]), rankdata(ys[index])
        if rx.std() == 0 or ry.std() == 0:
            values.append(np.nan)
        else:
            values.append(float(np.corrcoef(rx, ry)[0, 1]))
    return np.array(values)


def item_draws(n_items: int, draws: int, seed: int) -> np.ndarray:
    """Bootstrap draws over items: draws x n_items counts (multinomial, n_items picks each)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=draws)


def interval(values: np.ndarray) -> list[float] | None:
    """95% percentile interval of bootstrap values (NaN draws left out); None when none is defined."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def rounded(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


# --- per item: top-1 reranking and selection --------------------------------------------------

def top1_values(groups: list[list[dict]], name: str, truth: str) -> np.ndarray:
    """Per item: the truth of the candidate the signal ranks first, its expectation over a tie
    (a tie broken at random); with no candidate scored, a random pick's expectation."""
    values = []
    for candidates in groups:
        scores = ranked([c["signals"].get(name) for c in candidates])
        top = scores == scores.max()
        values.append(float(np.mean([float(c[truth]) for c, t in zip(candidates, top) if t])))
    return np.array(values)


# --- the figures ------------------------------------------------------------------------------

def by_item(records: list[dict]) -> tuple[list[str], list[list[dict]], dict]:
    """Items in first-seen order, each item's sampled candidates, and its greedy candidate."""
    order, sampled, greedy = [], {}, {}
    for r in records:
        if r["item"] not in sampled:
            order.append(r["item"])
            sampled[r["item"]] = []
        if r["greedy"]:
            greedy[r["item"]] = r
        else:
            sampled[r["item"]].append(r)
    return order, [sampled[i] for i in order], greedy


def signal_names(records: list[dict]) -> list[str]:
    names = []
    for r in records:
        names.extend(n for n in r["signals"] if n not in names)
    return names


def beats_nothing(reward: float, nothing_reward: float, margin: float = BEATS_NOTHING_MARGIN) -> bool:
    return reward >= nothing_reward + margin - 1e-9


def scored(records: list[dict], margin: float) -> list[dict]:
    """The records the figures are over: items whose gold command is broken here left out;
    beats_nothing anew by `margin` where the rewards it compares are recorded (`beats_reward`,
    the reward without bash's own complaints, else `reward`)."""
    return [r | ({"beats_nothing": beats_nothing(r.get("beats_reward", r["reward"]), r["nothing_reward"], margin)}
                 if "nothing_reward" in r else {})
            for r in records if not r.get("gold_broken")]


def audit_figures(records: list[dict], *, rules: dict, keeps, threshold: float, shellcheck_available: bool,
                  bootstrap: int = 1000, seed: int = 0, margin: float = BEATS_NOTHING_MARGIN) -> dict:
    """Every signal against the three truths, with bootstrap intervals over items; and the
    reference points (random pick, greedy, oracle) and the positives of each truth. A record
    with the do-nothing command's reward gets beats_nothing anew, by `margin`. `rules`: each
    signal's selection rule by name ('rank' where it is not named); `keeps(rule, values)`: which
    of one item's candidates the rule keeps, for the share of items it starves."""
    broken = len({r["item"] for r in records if r.get("gold_broken")})
    records = scored(records, margin)
    items, groups, greedy = by_item(records)
    n_items = len(items)
    counts = item_draws(n_items, bootstrap, seed)
    flat = [c for g in groups for c in g]
    item_of = np.repeat(np.arange(n_items), [len(g) for g in groups])
    weights = counts[:, item_of]
    full = np.ones((1, len(flat)))
    trivial = np.array([g[0]["trivial_item"] for g in groups], bool)
    hard = ~trivial[item_of]  # candidates of the items where doing nothing does not succeed
    usable = np.array([c["usable"] for c in flat], bool)
    success = np.array([c["success"] for c in flat], bool)
    beats = np.array([c["beats_nothing"] for c in flat], bool)
    reward = np.array([c["reward"] for c in flat], float)
    index_draws = [np.repeat(np.arange(len(flat)), row) for row in weights]

    def positive_items(labels, subset):
        return len(set(item_of[subset & labels]))

    def auc(scores, labels, subset):
        point = auroc_draws(scores[subset], labels[subset], full[:, subset])[0]
        if positive_items(labels, subset) < MIN_POSITIVE_ITEMS:
            return rounded(point), None
        return rounded(point), interval(auroc_draws(scores[subset], labels[subset], weights[:, subset]))

    def item_mean(values, subset_items):
        w = counts[:, subset_items]
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = (w * values[subset_items]).sum(1) / w.sum(1)
        return rounded(values[subset_items].mean()) if subset_items.any() else None, interval(draws)

    hard_items = ~trivial
    all_items = np.ones(n_items, bool)
    share = lambda truth: np.array([np.mean([float(c[truth]) for c in g]) for g in groups])  # noqa: E731
    figures = {}
    for name in signal_names(records):
        scores = ranked([c["signals"].get(name) for c in flat])
        a, a_ci = auc(scores, success, hard)
        b, b_ci = auc(scores, beats, np.ones(len(flat), bool))
        au, au_ci = auc(scores, success, hard & usable)
        bu, bu_ci = auc(scores, beats, usable)
        rho = spearman_draws(scores, reward, [np.arange(len(flat))])[0]
        top1, top1_ci = item_mean(top1_values(groups, name, "success"), hard_items)
        top1_b, top1_b_ci = item_mean(top1_values(groups, name, "beats_nothing"), all_items)
        gain, gain_ci = item_mean(top1_values(groups, name, "beats_nothing") - share("beats_nothing"),
                                  all_items)
        rule = rules.get(name, "rank")
        kept = [keeps(rule, [c["signals"].get(name) for c in g]) for g in groups]
        values = [[c["signals"].get(name) for c in g] for g in groups]
        cost = [c.get("cost", {}).get(name) for c in flat]
        figures[name] = {
            "auroc": a, "auroc_ci": a_ci, "auroc_beats_nothing": b, "auroc_beats_nothing_ci": b_ci,
            "auroc_usable": au, "auroc_usable_ci": au_ci,
            "auroc_beats_nothing_usable": bu, "auroc_beats_nothing_usable_ci": bu_ci,
            "spearman_reward": rounded(rho),
            "spearman_ci": interval(spearman_draws(scores, reward, index_draws)),
            "top1_success": top1, "top1_ci": top1_ci,
            "top1_beats_nothing": top1_b, "top1_beats_nothing_ci": top1_b_ci,
            "top1_gain_beats_nothing": gain, "top1_gain_beats_nothing_ci": gain_ci,
            "rule": rule,
            "starved": rounded(np.mean([not any(k) for k in kept])),
            "tied": rounded(np.mean([len({v for v in vs}) == 1 for vs in values])),
            "seconds_per_candidate": (round(float(np.mean([c for c in cost if c is not None])), 5)
                                      if any(c is not None for c in cost) else None),
        }
    anyone = lambda truth: np.array([float(any(c[truth] for c in g)) for g in groups])  # noqa: E731
    greedy_of = lambda truth: np.array([float(greedy[i][truth]) if i in greedy else np.nan  # noqa: E731
                                        for i in items])
    random_top1, random_ci = item_mean(share("success"), hard_items)
    oracle, oracle_ci = item_mean(anyone("success"), hard_items)
    has_greedy = ~np.isnan(greedy_of("success"))
    greedy_s, greedy_ci = item_mean(np.nan_to_num(greedy_of("success")), hard_items & has_greedy)
    random_b, random_b_ci = item_mean(share("beats_nothing"), all_items)
    oracle_b, oracle_b_ci = item_mean(anyone("beats_nothing"), all_items)
    greedy_b, greedy_b_ci = item_mean(np.nan_to_num(greedy_of("beats_nothing")), has_greedy)
    return {
        "signals": figures,
        "random_top1": random_top1, "random_top1_ci": random_ci,
        "greedy_success": greedy_s, "greedy_success_ci": greedy_ci,
        "oracle_success": oracle, "oracle_success_ci": oracle_ci,
        "random_top1_beats_nothing": random_b, "random_top1_beats_nothing_ci": random_b_ci,
        "greedy_beats_nothing": greedy_b, "greedy_beats_nothing_ci": greedy_b_ci,
        "oracle_beats_nothing": oracle_b, "oracle_beats_nothing_ci": oracle_b_ci,
        "items": n_items, "nontrivial_items": int(hard_items.sum()), "broken_items_left_out": broken,
        "candidates_per_item": round(len(flat) / n_items, 3) if n_items else 0,
        "sampled_candidates": len(flat), "usable_candidates": int(usable.sum()),
        "positive_items": {"success_nontrivial": positive_items(success, hard),
                           "beats_nothing": positive_items(beats, np.ones(len(flat), bool))},
        "min_positive_items_for_intervals": MIN_POSITIVE_ITEMS,
        "positives": {"success_nontrivial": int(success[hard].sum()),
                      "success_nontrivial_usable": int(success[hard & usable].sum()),
                      "success_trivial": int(success[~hard].sum()),
                      "beats_nothing": int(beats.sum()),
                      "beats_nothing_usable": int((beats & usable).sum())},
        "bootstrap": {"draws": bootstrap, "seed": seed, "over": "items"},
        "beats_nothing_margin": margin, "threshold": threshold,
        "shellcheck": shellcheck_available,
    }


def paired_changes(before: list[dict], after: list[dict], *, bootstrap: int = 1000, seed: int = 0,
                   margin: float = BEATS_NOTHING_MARGIN) -> dict:
    """Two audits of the same items (say, before and after training): per signal in both, the
    change of its AUROC for beats_nothing, of its AUROC for success (items where doing nothing
    does not succeed), and of its top-1 beats_nothing, with a paired bootstrap over the items:
    each draw takes the same items from both audits."""
    def prepared(records):
        items, groups, _ = by_item(scored(records, margin))
        return dict(zip(items, groups))
    first, second = prepared(before), prepared(after)
    items = [i for i in first if i in second]
    counts = item_draws(len(items), bootstrap, seed)
    full = np.ones((1, len(items)), int)

    def figure(groups, name):
        """(point, per-draw values) of the three figures over `items`."""
        flat = [c for i in items for c in groups[i]]
        item_of = np.repeat(np.arange(len(items)), [len(groups[i]) for i in items])
        scores = ranked([c["signals"].get(name) for c in flat])
        hard = np.array([not c["trivial_item"] for c in flat])
        beats = np.array([c["beats_nothing"] for c in flat], bool)
        success = np.array([c["success"] for c in flat], bool)
        top1 = top1_values([groups[i] for i in items], name, "beats_nothing")
        out = {}
        for key, weights in (("point", full), ("draws", counts)):
            w = weights[:, item_of]
            out[key] = {"auroc_beats_nothing": auroc_draws(scores, beats, w),
                        "auroc": auroc_draws(scores[hard], success[hard], w[:, hard]),
                        "top1_beats_nothing": (weights * top1).sum(1) / weights.sum(1)}
        return out
    names = [n for n in signal_names(before) if n in signal_names(after)]
    changes = {}
    for name in names:
        a, b = figure(first, name), figure(second, name)
        changes[name] = {}
        for key in ("auroc_beats_nothing", "auroc", "top1_beats_nothing"):
            point = b["point"][key][0] - a["point"][key][0]
            changes[name][key] = {"before": rounded(a["point"][key][0]), "after": rounded(b["point"][key][0]),
                                  "change": rounded(point),
                                  "change_ci": interval(b["draws"][key] - a["draws"][key])}
    return {"items": len(items), "bootstrap": {"draws": bootstrap, "seed": seed, "over": "items, paired"},
            "signals": changes}


def changes_table(changes: dict) -> str:
    """The printed table of paired_changes."""
    header = ("signal", "AUROC beats_nothing: before -> after, change [95%]", "AUROC success",
              "top-1 beats_nothing")
    rows = [header]
    for name, figures in changes["signals"].items():
        cells = [name]
        for key in ("auroc_beats_nothing", "auroc", "top1_beats_nothing"):
            f = figures[key]
            if f["change"] is None:
                cells.append("n/a")
            else:
                ci = f" [{f['change_ci'][0]:+.2f}, {f['change_ci'][1]:+.2f}]" if f["change_ci"] else ""
                cells.append(f"{f['before']:.3f} -> {f['after']:.3f}, {f['change']:+.3f}{ci}")
        rows.append(tuple(cells))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = [f"{changes['items']} items in both audits; paired bootstrap over items"]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows])


# --- the table and the plot -------------------------------------------------------------------

def with_interval(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def audit_table(figures: dict) -> str:
    """The printed table: one row per signal, its intervals, and the reference points."""
    p = figures["positives"]
    lines = [
        "truth: the domain's real tools accept the command line (no gold commands here: success is "
        "'accepted'; doing nothing runs no tool, so every item counts and beats_nothing is success)",
    ] if figures.get("truth") == "tools" else []
    lines += [
        f"{figures['items']} items ({figures['nontrivial_items']} where doing nothing does not "
        f"succeed; {figures.get('broken_items_left_out', 0)} left out, their gold command's program "
        f"missing here), {figures['sampled_candidates']} sampled candidates "
        f"({figures['usable_candidates']} usable); positives: success on those items "
        f"{p['success_nontrivial']} ({p['success_nontrivial_usable']} usable) on "
        f"{figures['positive_items']['success_nontrivial']} items, beats_nothing "
        f"{p['beats_nothing']} ({p['beats_nothing_usable']} usable) on "
        f"{figures['positive_items']['beats_nothing']} items (no AUROC interval below "
        f"{figures['min_positive_items_for_intervals']} items)",
        f"top-1 success: random pick {with_interval(figures['random_top1'], figures['random_top1_ci'])}, "
        f"greedy {with_interval(figures['greedy_success'], figures['greedy_success_ci'])}, "
        f"oracle (pass@K) {with_interval(figures['oracle_success'], figures['oracle_success_ci'])}",
        f"top-1 beats_nothing: random pick "
        f"{with_interval(figures['random_top1_beats_nothing'], figures['random_top1_beats_nothing_ci'])}, "
        f"greedy {with_interval(figures['greedy_beats_nothing'], figures['greedy_beats_nothing_ci'])}, "
        f"oracle {with_interval(figures['oracle_beats_nothing'], figures['oracle_beats_nothing_ci'])}",
        "",
    ]
    header = ("signal", "AUROC success", "AUROC beats_nothing", "  among usable", "Spearman reward",
              "top-1 success", "top-1 beats_nothing", "  gain on random", "starved", "tied", "s/cand")
    rows = [header]
    for name, f in figures["signals"].items():
        rows.append((name, with_interval(f["auroc"], f["auroc_ci"]),
                     with_interval(f["auroc_beats_nothing"], f["auroc_beats_nothing_ci"]),
                     with_interval(f["auroc_beats_nothing_usable"], f["auroc_beats_nothing_usable_ci"]),
                     with_interval(f["spearman_reward"], f["spearman_ci"]),
                     with_interval(f["top1_success"], f["top1_ci"]),
                     with_interval(f["top1_beats_nothing"], f["top1_beats_nothing_ci"]),
                     with_interval(f["top1_gain_beats_nothing"], f["top1_gain_beats_nothing_ci"]),
                     f"{f['starved']:.2f}", f"{f['tied']:.2f}",
                     "n/a" if f["seconds_per_candidate"] is None else f"{f['seconds_per_candidate']:.4f}"))
    widths = [max(len(str(row[k])) for row in rows) for k in range(len(header))]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def plot_audit(figures: dict, path: Path) -> None:
    """audit.png: each signal's AUROC (success on non-trivial items; beats_nothing) and its
    top-1 beats_nothing, with 95% intervals, beside chance and the random pick."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from support.run_directory import write_bytes
    names = list(figures["signals"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * len(names) + 2), sharey=True,
                             constrained_layout=True)
    y = np.arange(len(names))
    panels = [(axes[0], [("auroc", "auroc_ci", "success (non-trivial items)", -0.15),
                         ("auroc_beats_nothing", "auroc_beats_nothing_ci", "beats_nothing", 0.15)],
               "AUROC", 0.5, "chance"),
              (axes[1], [("top1_beats_nothing", "top1_beats_nothing_ci", "beats_nothing", -0.15),
                         ("top1_success", "top1_ci", "success (non-trivial items)", 0.15)],
               "top-1 pick", figures["random_top1_beats_nothing"], "random pick (beats_nothing)")]
    for ax, series, title, reference, reference_label in panels:
        for color, (key, ci_key, label, offset) in enumerate(series):
            xs = [figures["signals"][n][key] for n in names]
            cis = [figures["signals"][n][ci_key] for n in names]
            shown = [k for k, x in enumerate(xs) if x is not None and cis[k]]
            bare = [k for k, x in enumerate(xs) if x is not None and not cis[k]]
            if shown:
                ax.errorbar([xs[k] for k in shown], y[shown] + offset,
                            xerr=[[xs[k] - cis[k][0] for k in shown], [cis[k][1] - xs[k] for k in shown]],
                            fmt="o", capsize=2, color=f"C{color}", label=label)
            if bare:  # too few items with a positive for an interval: hollow
                ax.plot([xs[k] for k in bare], y[bare] + offset, "o", mfc="none",
                        color=f"C{color}", label=f"{label}, no interval (positives on < "
                        f"{figures.get('min_positive_items_for_intervals', MIN_POSITIVE_ITEMS)} items)")
        if reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", label=reference_label)
        ax.set_title(title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.03), fontsize="small")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    if figures.get("truth") == "tools":
        fig.suptitle("truth: the domain's real tools accept the command line (success and beats_nothing alike)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
