"""Which key each ``dcache bench`` request names: uniform, Zipf, and a hot key.

Design note
-----------
Keys are numbered ``0 .. n-1``. A distribution is given as text
(``uniform`` or ``zipf:S``) and parsed once into a ``KeyDistribution``; a
``KeySampler`` then draws key numbers from it with the random generator it
is given (seeded, so a run's keys can be drawn again).

* ``uniform``: every key equally likely; a draw is one ``random()`` and a
  multiplication, O(1).
* ``zipf:S`` (S > 0): key ``k`` has probability proportional to
  ``1 / (k + 1) ** S``, so key 0 is the most popular, key 1 the second...
  (S = 1.1 puts 13.5% of requests on key 0 of 100,000; S = 0.99 is
  YCSB's default). The cumulative distribution is computed once, in O(n)
  time and about 32 bytes a key (a list of floats: 3 MB and a tenth of a
  second for 100,000 keys; a list, not an ``array('d')``, because bisecting
  an array boxes a float at every step and doubles the cost of a draw); a
  draw is one ``random()`` and a binary search over it (``bisect``, in C):
  O(log n), about a microsecond.
* ``hot_share`` h (0 <= h <= 1): key 0 takes exactly a share h of the
  draws, and the other draws follow the distribution over keys ``1 .. n-1``
  (so with ``zipf:S`` key 1 is as likely as the law's second key, relative
  to the rest). It makes one key a known share of the load, for a hot-key
  benchmark.

A draw reuses its one uniform variate: below h it picks key 0, above it is
rescaled to [0, 1) to pick among the others (the rescaled value is uniform
given that it is above h).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

__all__ = ["KeyDistribution", "KeySampler"]


@dataclass(frozen=True, slots=True)
class KeyDistribution:
    """A key distribution: ``kind`` is ``"uniform"`` or ``"zipf"``; ``s`` is Zipf's exponent.

    Raises:
        ValueError: an unknown kind, or a Zipf exponent that is not a number above 0.
    """

    kind: str = "uniform"
    s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zipf"):
            raise ValueError(f"unknown key distribution {self.kind!r}: uniform or zipf:S")
        if self.kind == "zipf" and not self.s > 0:
            raise ValueError(f"zipf's exponent must be above 0, not {self.s}")

    @classmethod
    def parse(cls, text: str) -> KeyDistribution:
        """``uniform`` or ``zipf:S`` (S a number above 0, e.g. ``zipf:1.1``).

        Raises:
            ValueError: anything else.
        """
        kind, sep, arg = text.strip().partition(":")
        if kind == "uniform" and not sep:
            return cls()
        if kind == "zipf" and sep:
            try:
                s = float(arg)
            except ValueError:
                raise ValueError(f"zipf's exponent must be a number, not {arg!r}") from None
            return cls("zipf", s)
        raise ValueError(f"key distribution must be uniform or zipf:S (e.g. zipf:1.1), not {text!r}")


class KeySampler:
    """Draws key numbers in ``0 .. keys-1`` from a distribution (see the module note).

    Args:
        keys: size of the key space (at least 1).
        dist: the distribution.
        hot_share: the share of draws that name key 0 exactly (0: none set apart).
        rng: the random generator to draw with.

    Raises:
        ValueError: ``keys < 1`` or ``hot_share`` outside [0, 1].
    """

    __slots__ = ("_random", "_hot", "_first", "_span", "_cdf")

    def __init__(self, keys: int, dist: KeyDistribution, hot_share: float, rng: random.Random) -> None:
        if keys < 1:
            raise ValueError("the key space needs at least one key")
        if not 0 <= hot_share <= 1:
            raise ValueError(f"the hot key's share must be in [0, 1], not {hot_share}")
        self._random = rng.random
        self._hot = hot_share if keys > 1 else 1.0
        #: The keys drawn from the distribution: ``_first .. keys-1``.
        self._first = 1 if hot_share > 0 else 0
        self._span = keys - self._first
        self._cdf: list[float] | None = None
        if dist.kind == "zipf" and self._span > 0:
            cdf = list(accumulate((k + 1) ** -dist.s for k in range(self._first, keys)))
            scale = 1.0 / cdf[-1]
            cdf = [c * scale for c in cdf]
            cdf[-1] = 1.0  # a rounding error must not leave a draw past the last key
            self._cdf = cdf

    def draw(self) -> int:
        """One key number."""
        u = self._random()
        hot = self._hot
        if u < hot:
            return 0
        x = (u - hot) / (1.0 - hot)
        if self._cdf is None:
            return self._first + min(self._span - 1, int(x * self._span))
        return self._first + bisect_right(self._cdf, x)
