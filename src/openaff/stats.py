"""Statistics of seeds: paired contrasts between fusion types, Holm's correction, named contrasts.

Runs of a study with the same seed share their data order and augmentation, so two fusion types are
compared *paired*, seed by seed (``scipy.stats.ttest_rel``): the seed's own luck cancels. The minimum
detectable difference says how small a true difference the run could have found (a two-sided 5 %
paired t-test at about 80 % power, at the observed spread of the differences).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

__all__ = ["holm", "paired_contrast", "parse_contrasts", "contrast_table"]


def paired_contrast(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a - b`` paired over seeds: ``n``, ``mean``, ``sd``, 95 % t interval ``lo``/``hi``, ``p`` (paired t-test)
    and ``mdd`` (the smallest difference a two-sided 5 % paired t-test detects with about 80 % power at this sd).

    Fewer than two pairs (or no spread) leave the interval, p and mdd None.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    out = dict(n=n, mean=statistics.fmean(d) if d else None, sd=None, lo=None, hi=None, p=None, mdd=None)
    if n < 2:
        return out
    sd = statistics.stdev(d)
    out["sd"] = sd
    if sd == 0:
        return out
    t = stats.ttest_rel(a, b)
    ci = t.confidence_interval(0.95)
    q = stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)
    out.update(lo=float(ci.low), hi=float(ci.high), p=float(t.pvalue), mdd=float(q * sd / math.sqrt(n)))
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order; None stays None.

    Written here because SciPy has only the false-discovery-rate correction
    (``scipy.stats.false_discovery_control``) and statsmodels would be a large dependency for six lines.
    """
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(known)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def parse_contrasts(text: str, available: Sequence[str]) -> list[tuple[str, str]]:
    """``"aff-add,iaff-aff"`` -> ``[("aff", "add"), ("iaff", "aff")]``, each type checked against ``available``.

    Raises:
        ValueError: a contrast that is not ``A-B``, names a type twice or a type not in ``available``.
    """
    pairs = []
    for item in (s.strip() for s in text.split(",")):
        a, sep, b = item.partition("-")
        if not sep or not a or not b or "-" in b:
            raise ValueError(f"contrast {item!r} is not TYPE-TYPE (e.g. aff-add)")
        if a == b:
            raise ValueError(f"contrast {item!r} compares a type with itself")
        missing = [t for t in (a, b) if t not in available]
        if missing:
            raise ValueError(f"contrast {item!r}: {', '.join(missing)} not in this study's types "
                             f"({', '.join(available)})")
        pairs.append((a, b))
    return pairs


def contrast_table(values: Mapping[str, Mapping[int, float]], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Paired contrasts over the seeds both types have, with Holm-adjusted p-values over the family ``pairs``.

    Args:
        values: fusion type -> seed -> value.
        pairs: ``(a, b)`` contrasts, each ``a - b``.

    Returns:
        one dict per pair: ``a``, ``b``, ``seeds`` and :func:`paired_contrast`'s fields, plus ``p_holm``.
    """
    rows = []
    for a, b in pairs:
        seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
        rows.append(dict(a=a, b=b, seeds=seeds, **paired_contrast([values[a][s] for s in seeds],
                                                                  [values[b][s] for s in seeds])))
    for row, p in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p
    return rows
