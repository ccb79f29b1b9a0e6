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
