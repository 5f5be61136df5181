"""Latency percentiles, throughput over time, and the ledger's plots (matplotlib Figures, no pyplot state).

Pure functions over numbers; the plots take a :meth:`whatrack.proof.ledger.Ledger.frame` DataFrame and return a
``matplotlib.figure.Figure`` that a notebook displays and a run saves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: One colour per verdict in every chart (ledger verdicts and pass/fail): lost and fail in red, ok and pass in green.
VERDICT_COLORS: dict[str, str] = {
    "ok": "#2a9d4a", "pass": "#2a9d4a", "recovered": "#1f77b4", "duplicated": "#e67e22", "unexpected": "#8e44ad",
    "lost": "#c0392b", "fail": "#c0392b", "unknown": "#999999", "no evidence": "#999999",
}


@dataclass(frozen=True)
class Percentiles:
    """Latency distribution in milliseconds (``n == 0``: nothing measured, every figure is NaN)."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "p50_ms": self.p50, "p95_ms": self.p95, "p99_ms": self.p99, "max_ms": self.max}

    def __str__(self) -> str:
        if not self.n:
            return "n=0"
        return (f"p50 {self.p50:.0f} ms, p95 {self.p95:.0f} ms, p99 {self.p99:.0f} ms, max {self.max:.0f} ms "
                f"(n={self.n})")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, linear interpolation (numpy's default). Pure."""
    if not sorted_values:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(values_ms: Iterable[float | None]) -> Percentiles:
    """p50 / p95 / p99 / max of the given latencies (None and NaN are skipped). Pure."""
    v = sorted(x for x in values_ms if x is not None and not math.isnan(x))
    if not v:
        return Percentiles(0, math.nan, math.nan, math.nan, math.nan)
    return Percentiles(len(v), percentile(v, 0.50), percentile(v, 0.95), percentile(v, 0.99), v[-1])


def throughput(times: Iterable[float | None], *, bucket_s: float = 1.0) -> list[tuple[float, int]]:
    """Events per bucket: ``[(seconds since the first event, count), ...]`` with empty buckets kept. Pure."""
    t = sorted(x for x in times if x is not None and not math.isnan(x))
    if not t:
        return []
    if bucket_s <= 0:
        raise ValueError("bucket_s must be > 0")
    t0 = t[0]
    counts = [0] * (int((t[-1] - t0) // bucket_s) + 1)
    for x in t:
        counts[int((x - t0) // bucket_s)] += 1
    return [(i * bucket_s, c) for i, c in enumerate(counts)]


def plot_throughput(frame: pd.DataFrame, *, bucket_s: float = 1.0, title: str = "throughput") -> Figure:
    """Messages per second over time: published (sent_at), committed (created_at), on realtime (published_at)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    t0 = frame["sent_at"].min() if len(frame) else 0.0
    for col, label in (("sent_at", "published to QStash"), ("created_at", "committed"),
                       ("published_at", "on realtime")):
        series = throughput(frame[col].tolist(), bucket_s=bucket_s) if len(frame) else []
        if series:
            first = frame[col].min() - t0
            ax.plot([first + s for s, _ in series], [c / bucket_s for _, c in series], label=label)
    ax.set_xlabel("seconds since the first publish")
    ax.set_ylabel("messages / s")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_latency(frame: pd.DataFrame, *, title: str = "end-to-end latency") -> Figure:
    """Histogram (log scale) of publish → commit and publish → realtime latency, with p50/p99 marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    for col, label in (("commit_ms", "publish → commit"), ("realtime_ms", "publish → realtime")):
        vals = [v for v in frame[col].tolist() if v is not None and not math.isnan(v) and v > 0] if len(frame) else []
        if not vals:
            continue
        lo, hi = max(min(vals), 0.1), max(vals)
        bins = [lo * (hi / lo) ** (i / 40) for i in range(41)] if hi > lo else 10
        stats = latency_stats(vals)
        ax.hist(vals, bins=bins, alpha=0.6, label=f"{label} (p50 {stats.p50:.0f}, p99 {stats.p99:.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("messages")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig
