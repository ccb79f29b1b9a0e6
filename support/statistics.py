"""Statistics that can tell arms apart on the same benchmark items: means with percentile
bootstrap intervals over items, the paired difference of two models on the same items, and
McNemar's exact test on paired successes.

The rest may call: bootstrap_mean, paired_difference, mcnemar_exact, against_baseline, share_of_lift.
"""
import numpy as np


def bootstrap_mean(values, draws: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """The mean of per-item values and its 95% percentile interval, items drawn with replacement."""
    values = np.asarray(values, float)
    if len(values) == 0:
        raise ValueError("no items")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), [float(low), float(high)]


def paired_difference(treated, control, draws: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean of treated - control over the same items (in the same order), with its 95% paired
    bootstrap interval (an item's two values are drawn together)."""
    treated, control = np.asarray(treated, float), np.asarray(control, float)
    if treated.shape != control.shape:
        raise ValueError(f"paired values need the same items: {treated.shape} and {control.shape}")
    return bootstrap_mean(treated - control, draws, seed)


def mcnemar_exact(treated: list[bool], control: list[bool]) -> dict:
    """McNemar's exact test on paired successes: b items only the treated model solves, c only
    the control; two-sided p of b given b + c under Binomial(b + c, 1/2)."""
    from scipy.stats import binom
    if len(treated) != len(control):
        raise ValueError(f"paired successes need the same items: {len(treated)} and {len(control)}")
    b = sum(bool(t) and not bool(c) for t, c in zip(treated, control))
    c = sum(bool(c) and not bool(t) for t, c in zip(treated, control))
    p = 1.0 if b + c == 0 else min(1.0, 2 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return {"only_treated": b, "only_control": c, "p": p}


def against_baseline(seed_runs: list[dict], baseline: dict, draws: int = 2000, seed: int = 0) -> dict:
    """An arm's final evaluation over seeds against a baseline model on the same items. Each run
    and the baseline: {item id: (success, reward)}. Items: those every run and the baseline hold.
    Per arm: success and reward (per item, the mean over seeds) with intervals; their paired
    differences from the baseline; McNemar's exact test per seed; and `per_item_success`, {item:
    success, the mean over seeds} (what the oracle's share is computed from)."""
    items = sorted(set(baseline).intersection(*seed_runs))
    if not items:
        raise ValueError("no item is evaluated in every run and in the baseline")
    per_item = {k: np.array([[run[i][k] for i in items] for run in seed_runs], float).mean(0) for k in (0, 1)}
    base = {k: np.array([baseline[i][k] for i in items], float) for k in (0, 1)}
    out = {"items": len(items), "seeds": len(seed_runs),
           "per_item_success": {i: float(v) for i, v in zip(items, per_item[0])}}
    for k, name in ((0, "success"), (1, "reward")):
        out[name], out[f"{name}_ci"] = bootstrap_mean(per_item[k], draws, seed)
        out[f"{name}_baseline"] = float(base[k].mean())
        out[f"{name}_change"], out[f"{name}_change_ci"] = paired_difference(per_item[k], base[k], draws, seed)
    out["mcnemar"] = [mcnemar_exact([run[i][0] for i in items], [baseline[i][0] for i in items])
                      for run in seed_runs]
    return out


def share_of_lift(arm, oracle, baseline, draws: int = 2000, seed: int = 0) -> dict:
    """How much of the oracle's lift over the baseline an arm recovers: (arm - baseline) /
    (oracle - baseline) of the per-item means (the same items, in the same order), with a 95%
    percentile interval from drawing items with replacement (an item's three values together).
    The share is None where the oracle does not lift (its lift 0 or less: then no selection could
    help, and none is judged), and the interval is None where more than 5% of the draws have no
    lift to share."""
    arm, oracle, baseline = (np.asarray(v, float) for v in (arm, oracle, baseline))
    if not arm.shape == oracle.shape == baseline.shape or len(arm) == 0:
        raise ValueError(f"the share needs the same items for all three: {arm.shape}, {oracle.shape}, {baseline.shape}")
    lift, gained = oracle.mean() - baseline.mean(), arm.mean() - baseline.mean()
    out = {"oracle_lift": float(lift), "arm_lift": float(gained), "share": None, "share_ci": None}
    if lift <= 0:
        return out
    out["share"] = float(gained / lift)
    rows = np.random.default_rng(seed).integers(0, len(arm), size=(draws, len(arm)))
    lifts, gains = oracle[rows].mean(1) - baseline[rows].mean(1), arm[rows].mean(1) - baseline[rows].mean(1)
    usable = lifts > 0
    if usable.mean() >= 0.95:
        low, high = np.percentile(gains[usable] / lifts[usable], [2.5, 97.5])
        out["share_ci"] = [float(low), float(high)]
    return out
