"""compare's statistics against scipy: bootstrap intervals over items, the paired difference
and McNemar's exact test; an arm against the untrained model on constructed evaluations."""
import numpy as np
import pytest

from support import statistics as st


@pytest.mark.parametrize("b, c", [(0, 0), (1, 9), (5, 5), (12, 3), (0, 7), (40, 25)])
def test_mcnemar_exact_equals_scipy_binomtest(b, c):
    from scipy.stats import binomtest
    treated = [True] * b + [False] * c + [True] * 4 + [False] * 6  # 4 both, 6 neither: not counted
    control = [False] * b + [True] * c + [True] * 4 + [False] * 6
    result = st.mcnemar_exact(treated, control)
    assert (result["only_treated"], result["only_control"]) == (b, c)
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert result["p"] == pytest.approx(expected, rel=1e-9)


def test_mcnemar_textbook_value():
    # 1 discordant pair one way, 9 the other: p = 2 * (1 + 10) / 2**10
    assert st.mcnemar_exact([True] + [False] * 9, [False] + [True] * 9)["p"] == pytest.approx(22 / 1024)


def test_bootstrap_mean_agrees_with_scipy():
    from scipy.stats import bootstrap
    values = np.random.default_rng(0).random(150) < 0.2
    mean, (low, high) = st.bootstrap_mean(values, draws=5000, seed=1)
    theirs = bootstrap((values.astype(float),), np.mean, n_resamples=5000, method="percentile",
                       random_state=2).confidence_interval
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(theirs.low, abs=0.01) and high == pytest.approx(theirs.high, abs=0.01)


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(3)
    control = rng.random(100)
    treated = control + 0.05  # the same shift on every item: no doubt about it
    change, ci = st.paired_difference(treated, control)
    assert change == pytest.approx(0.05) and ci == pytest.approx([0.05, 0.05])
    with pytest.raises(ValueError):
        st.paired_difference([1.0], [1.0, 2.0])


def test_an_arm_against_the_baseline():
    baseline = {f"i{k}": (k < 2, 0.6) for k in range(10)}  # solves i0, i1
    seed0 = {f"i{k}": (k in (1, 2, 3), 0.7) for k in range(10)} | {"extra": (True, 1.0)}  # not in the baseline
    seed1 = {f"i{k}": (k in (2, 3), 0.8) for k in range(10)}
    f = st.against_baseline([seed0, seed1], baseline, draws=200)
    assert f["items"] == 10 and f["seeds"] == 2
    assert f["success"] == pytest.approx((3 + 2) / 2 / 10) and f["success_baseline"] == pytest.approx(0.2)
    assert f["success_change"] == pytest.approx(0.05) and f["reward_change"] == pytest.approx(0.15)
    assert f["reward_change_ci"] == pytest.approx([0.15, 0.15])
    assert f["mcnemar"][0] | {"p": None} == {"only_treated": 2, "only_control": 1, "p": None}
    assert f["mcnemar"][1]["only_treated"] == 2 and f["mcnemar"][1]["only_control"] == 2
    assert f["per_item_success"] == {f"i{k}": {1: 0.5, 2: 1.0, 3: 1.0}.get(k, 0.0) for k in range(10)}


def test_the_loop_experiments_figures():
    """bench/loop_experiment.py: success only on items where doing nothing fails, beats_nothing on
    all; per seed, over seeds, paired against the untrained model; 'every seed above' exact."""
    import loop_experiment
    # (success, beats_nothing, trivial_item); items t0, t1: doing nothing succeeds there
    base = {f"i{k}": (k == 0, k in (0, 1), False) for k in range(8)} | {f"t{k}": (True, False, True) for k in range(2)}
    seed0 = {f"i{k}": (k in (0, 1), k in (0, 1, 2), False) for k in range(8)} | {f"t{k}": (False, True, True) for k in range(2)}
    seed1 = {f"i{k}": (k == 0, k in (0, 1, 3), False) for k in range(8)} | {f"t{k}": (True, True, True) for k in range(2)}
    f = loop_experiment.arm_figures([seed0, seed1], base)
    success, beats = f["success_nontrivial"], f["beats_nothing"]
    assert success["items"] == 8 and beats["items"] == 10  # the trivial items count only for beats_nothing
    assert success["per_seed"] == [0.25, 0.125] and success["untrained"] == 0.125
    assert success["mean"] == pytest.approx(0.1875) and success["change"] == pytest.approx(0.0625)
    assert not success["every_seed_above_untrained"]  # seed 1 only equals it
    assert beats["per_seed"] == [0.5, 0.5] and beats["untrained"] == 0.2 and beats["every_seed_above_untrained"]
    assert beats["change"] == pytest.approx(0.3)
    assert success["mcnemar"][0] | {"p": None} == {"only_treated": 1, "only_control": 0, "p": None}


def test_the_share_of_the_oracles_lift():
    """Known answers: the untrained model solves 10 of 100 items, the oracle 50, an arm 30 (the
    oracle's items, half its gain): share 0.5 with an interval around it; an arm that loses items
    has a negative share; no share where the oracle does not lift."""
    from support.statistics import share_of_lift
    base = [1] * 10 + [0] * 90
    oracle = [1] * 50 + [0] * 50
    arm = [1] * 30 + [0] * 70
    out = share_of_lift(arm, oracle, base, draws=2000)
    assert out["oracle_lift"] == pytest.approx(0.4) and out["arm_lift"] == pytest.approx(0.2)
    assert out["share"] == pytest.approx(0.5) and out["share_ci"][0] < 0.5 < out["share_ci"][1]
    assert 0.3 < out["share_ci"][0] and out["share_ci"][1] < 0.7  # 40 items of lift: about ±0.15
    assert share_of_lift([0] * 100, oracle, base)["share"] == pytest.approx(-0.25)
    flat = share_of_lift(arm, base, base)
    assert flat["share"] is None and flat["share_ci"] is None and flat["oracle_lift"] == 0
    with pytest.raises(ValueError, match="the same items"):
        share_of_lift(arm, oracle[:50], base)


def test_compare_reports_each_arms_share_of_the_oracles_lift():
    """compare's lines where an oracle arm is among the runs: each other kind's share, and none to
    share where the oracle does not lift."""
    from support.reports import oracle_share_lines
    items = [f"held-{k:03d}" for k in range(100)]
    base = {i: (k < 10, 0.5) for k, i in enumerate(items)}
    oracle = "signal=inversion train-from=previous select=oracle data=cycle judge=self scorer=embed"
    arm = "signal=inversion train-from=previous select=threshold data=cycle judge=self scorer=embed"
    successes = {oracle: {i: float(k < 50) for k, i in enumerate(items)},
                 arm: {i: float(k < 30) for k, i in enumerate(items)}}
    lines = oracle_share_lines(successes, base)
    assert "the oracle, " + oracle + ", uses labels" in lines[0]
    assert lines[1].startswith(f"  {arm}: 0.50 [") and "of the oracle's lift +0.400 (100 items)" in lines[1]
    flat = oracle_share_lines({oracle: {i: float(k < 10) for k, i in enumerate(items)}, arm: successes[arm]}, base)
    assert "none to share (the oracle's lift is +0.000" in flat[1]
    assert oracle_share_lines({arm: successes[arm]}, base) == []  # no oracle among the runs
    # the oracle at the signal's count is a second ceiling, never an arm of the other's
    sized = oracle.replace("select=oracle", "select=oracle-sized")
    with_sized = oracle_share_lines(successes | {sized: {i: float(k < 20) for k, i in enumerate(items)}}, base)
    assert oracle in with_sized[0] and with_sized[1].startswith(f"  {arm}: 0.50 [") and len(with_sized) == 4
    assert sized in with_sized[2] and with_sized[3].startswith(f"  {arm}: 2.00 [")
    assert "of the oracle's lift +0.100" in with_sized[3]


def test_the_testbed_experiments_shares():
    """bench/testbed_experiment.py: per held-out item the mean success over an arm's seeds, then
    the share of the oracle's lift over the untrained model (known answers: the oracle's seeds
    solve items 0-3 and 0-1, the untrained model item 0, the arm items 0-1 in one seed of two)."""
    import testbed_experiment
    def outcomes(solved):
        return {f"h{k}": (k in solved, k in solved, False) for k in range(10)}
    base = outcomes({0})
    arms = {"oracle": [outcomes({0, 1, 2, 3}), outcomes({0, 1})], "inversion": [outcomes({0, 1}), outcomes({0})]}
    share = testbed_experiment.shares(arms, base, "oracle")["inversion"]
    assert share["oracle_lift"] == pytest.approx(0.2) and share["arm_lift"] == pytest.approx(0.05)
    assert share["share"] == pytest.approx(0.25)
    assert set(testbed_experiment.shares(arms, base, "oracle")) == {"inversion"}
    # the sized oracle (items 0-2 in both seeds) is a ceiling of its own, and no arm of the other's
    arms["oracle-sized"] = [outcomes({0, 1, 2}), outcomes({0, 1, 2})]
    assert set(testbed_experiment.shares(arms, base, "oracle")) == {"inversion"}
    sized = testbed_experiment.shares(arms, base, "oracle-sized")["inversion"]
    assert sized["oracle_lift"] == pytest.approx(0.2) and sized["share"] == pytest.approx(0.25)
    assert testbed_experiment.shares({"inversion": arms["inversion"]}, base, "oracle-sized") == {}
