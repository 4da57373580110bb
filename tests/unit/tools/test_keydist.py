"""Key distributions of ``dcache bench``: the sampler's frequencies against the law, with a fixed seed."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from dcache.tools.keydist import KeyDistribution, KeySampler

DRAWS = 200_000


def frequencies(sampler: KeySampler, n: int) -> list[float]:
    counts = Counter(sampler.draw() for _ in range(DRAWS))
    assert set(counts) <= set(range(n))
    return [counts[k] / DRAWS for k in range(n)]


def assert_follows(freq: list[float], law: list[float]) -> None:
    """Each key's frequency within 4.5 standard deviations of its probability (binomial), and chi-square near its mean."""
    for k, (f, p) in enumerate(zip(freq, law, strict=True)):
        sd = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(f - p) <= 4.5 * sd + 1e-9, f"key {k}: frequency {f:.5f}, law {p:.5f}"
    chi2 = sum(DRAWS * (f - p) ** 2 / p for f, p in zip(freq, law, strict=True) if p > 0)
    dof = len(law) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} for {dof} degrees of freedom"


def zipf_law(keys: range, s: float) -> list[float]:
    weights = [(k + 1) ** -s for k in keys]
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize("s", [0.99, 1.1, 2.0])
def test_zipf_frequencies_follow_the_law(s):
    n = 200
    sampler = KeySampler(n, KeyDistribution.parse(f"zipf:{s}"), 0.0, random.Random(7))
    assert_follows(frequencies(sampler, n), zipf_law(range(n), s))


def test_uniform_frequencies_are_flat():
    n = 100
    sampler = KeySampler(n, KeyDistribution.parse("uniform"), 0.0, random.Random(8))
    assert_follows(frequencies(sampler, n), [1 / n] * n)


@pytest.mark.parametrize("dist", ["uniform", "zipf:1.1"])
def test_hot_share_puts_exactly_that_share_on_key_0_and_the_rest_by_the_law(dist):
    n, hot = 100, 0.5
    parsed = KeyDistribution.parse(dist)
    sampler = KeySampler(n, parsed, hot, random.Random(9))
    rest = zipf_law(range(1, n), 1.1) if parsed.kind == "zipf" else [1 / (n - 1)] * (n - 1)
    assert_follows(frequencies(sampler, n), [hot] + [(1 - hot) * p for p in rest])


def test_one_key_and_edge_shares():
    assert {KeySampler(1, KeyDistribution.parse("zipf:1.1"), 0.0, random.Random(1)).draw() for _ in range(100)} == {0}
    assert {KeySampler(50, KeyDistribution(), 1.0, random.Random(1)).draw() for _ in range(100)} == {0}
    assert 0 not in {KeySampler(50, KeyDistribution(), 1e-12, random.Random(1)).draw() for _ in range(1000)}


def test_a_large_zipf_key_space_draws_every_rank_in_range():
    n = 1_000_000
    sampler = KeySampler(n, KeyDistribution.parse("zipf:0.99"), 0.0, random.Random(3))
    draws = [sampler.draw() for _ in range(50_000)]
    assert min(draws) == 0 and max(draws) < n and max(draws) > n // 2


@pytest.mark.parametrize("text", ["zipf", "zipf:", "zipf:0", "zipf:-1", "zipf:abc", "pareto", "uniform:2", ""])
def test_bad_distributions_are_refused(text):
    with pytest.raises(ValueError):
        KeyDistribution.parse(text)


@pytest.mark.parametrize(("keys", "hot"), [(0, 0.0), (10, -0.1), (10, 1.5)])
def test_bad_sampler_arguments_are_refused(keys, hot):
    with pytest.raises(ValueError):
        KeySampler(keys, KeyDistribution(), hot, random.Random(1))
