"""How much each matrix keeps: budgets, OWL, explicit densities."""

import pytest

from blocksparse.prune.allocation import explicit_densities, keep_counts, owl_densities


# ----------------------------------------------------------------- allocation
def test_keep_counts_meet_the_total_budget_exactly():
    shapes = {"a": (64, 64), "b": (32, 64), "c": (128, 64)}
    counts = keep_counts({"a": 0.7, "b": 0.6, "c": 0.4}, shapes, 16, 0.5)
    kept = sum(counts[n] * (shapes[n][0] // 16) for n in shapes)
    assert kept == 0.5 * sum((n // 16) * (k // 16) for n, k in shapes.values())
    assert counts["a"] > counts["c"]


def test_keep_counts_refuse_a_budget_they_cannot_meet():
    shapes = {"a": (32, 64), "b": (32, 64)}  # 4 block columns each
    with pytest.raises(ValueError, match="cannot keep a total density of 0.2000"):
        keep_counts({"a": 1.0, "b": 0.01}, shapes, 16, 0.2)


def test_owl_densities_centre_on_the_target():
    dens = owl_densities([0.01, 0.03, 0.02, 0.05], density=0.5, spread=0.08)
    assert sum(dens) / 4 == pytest.approx(0.5)
    assert max(dens) - min(dens) == pytest.approx(0.16)
    assert dens[3] == max(dens) and dens[0] == min(dens)


def test_explicit_densities_are_checked():
    shapes = {"a.q": (32, 32), "a.k": (32, 32), "b.q": (32, 32)}
    assert explicit_densities({"a": 0.6}, shapes, 0.5) == pytest.approx({"a.q": 0.6, "a.k": 0.6, "b.q": 0.3})
    assert explicit_densities({"a": 0.6, "a.k": 0.2}, shapes, 0.5)["a.k"] == 0.2  # longest key wins
    assert explicit_densities({"*.q": 0.25}, shapes, 0.5) == pytest.approx({"a.q": 0.25, "b.q": 0.25, "a.k": 1.0})
    with pytest.raises(ValueError, match="match no pruned linear"):
        explicit_densities({"c": 0.5}, shapes, 0.5)
    with pytest.raises(ValueError, match="leave density"):
        explicit_densities({"a": 1.0}, shapes, 0.5)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        explicit_densities({"a": 1.5}, shapes, 0.5)
