"""The loss ledger's classification on hand-made records (no I/O), its frame and plots, and the latency statistics."""

from __future__ import annotations

import itertools
import math

import pytest

from whatrack.proof.ledger import (
    DlqItem,
    Ledger,
    Observations,
    Publication,
    Replay,
    Sent,
    StoredRow,
    classify,
    provider_id_of,
    rows_from_store,
)
from whatrack.proof.plots import latency_stats, percentile, plot_latency, plot_throughput, throughput

OWNER = "5511999990000"


def pid(i: int) -> str:
    return f"{OWNER}:ID{i:04d}"


def sent(i: int, *, outcome: str = "accepted", at: float = 100.0) -> Sent:
    return Sent(pid(i), at, outcome, f"msg_{i}" if outcome == "accepted" else None)  # type: ignore[arg-type]


def row(i: int, *, conv: int = 1, created: float = 100.5, published: float | None = 100.7) -> StoredRow:
    return StoredRow(pid(i), f"ID{i:04d}", conv, created, published)


def pub(i: int, *, conv: int = 1) -> Publication:
    return Publication(f"conversation:{conv}", f"ID{i:04d}", i)


def dlq(i: int) -> DlqItem:
    return DlqItem(f"dlq-{i}", f"msg_{i}", pid(i), 503)


def one(ledger: Ledger) -> tuple[str, str]:
    assert len(ledger.entries) == 1
    return ledger.entries[0].verdict, ledger.entries[0].detail


# -- every cell of the decision table -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("outcome", "rows", "pubs", "in_dlq", "replayed", "expected"),
    [
        ("accepted", 1, 1, False, False, "ok"),
        ("unknown", 1, 1, False, False, "ok"),  # indeterminate, but observed exactly once
        ("accepted", 1, 1, True, True, "recovered"),
        ("accepted", 1, 1, False, True, "recovered"),
        ("accepted", 0, 0, False, False, "lost"),
        ("accepted", 1, 0, False, False, "lost"),  # stored, never on realtime
        ("accepted", 0, 1, False, False, "lost"),  # on realtime, no row
        ("accepted", 0, 0, True, False, "lost"),  # in the DLQ, not replayed
        ("accepted", 0, 0, True, True, "lost"),  # replayed and back in the DLQ
        ("accepted", 0, 0, False, True, "lost"),  # replayed, never arrived
        ("accepted", 1, 0, True, False, "lost"),
        ("unknown", 0, 0, False, False, "unknown"),
        ("unknown", 0, 0, True, False, "lost"),  # the DLQ proves QStash had it
        ("unknown", 1, 0, False, False, "lost"),  # the row proves QStash had it
        ("accepted", 2, 1, False, False, "duplicated"),
        ("accepted", 1, 2, False, False, "duplicated"),
        ("accepted", 2, 2, True, True, "duplicated"),
        ("unknown", 3, 0, False, False, "duplicated"),
    ],
)
def test_decision_table(outcome: str, rows: int, pubs: int, in_dlq: bool, replayed: bool, expected: str) -> None:
    obs = Observations(rows=tuple(row(1) for _ in range(rows)), publications=tuple(pub(1) for _ in range(pubs)),
                       dlq=(dlq(1),) if in_dlq else ())
    replays = [Replay(pid(1), "dlq-1", "msg_new")] if replayed else []
    verdict, detail = one(classify([sent(1, outcome=outcome)], obs, replays))
    assert verdict == expected, detail
    assert detail


@pytest.mark.parametrize(("rows", "pubs"), [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2)])
def test_never_sent_is_unexpected_or_duplicated(rows: int, pubs: int) -> None:
    obs = Observations(rows=tuple(row(7) for _ in range(rows)), publications=tuple(pub(7) for _ in range(pubs)))
    verdict, _ = one(classify([], obs))
    assert verdict == ("duplicated" if rows > 1 or pubs > 1 else "unexpected")


def test_exhaustive_grid_every_combination_has_exactly_one_verdict() -> None:
    """Every combination of the inputs lands in exactly one verdict, and the invariants hold for each."""
    for was_sent, outcome, rows, pubs, in_dlq, replayed in itertools.product(
            (True, False), ("accepted", "unknown"), range(3), range(3), (True, False), (True, False)):
        s = [sent(1, outcome=outcome)] if was_sent else []
        obs = Observations(rows=tuple(row(1) for _ in range(rows)), publications=tuple(pub(1) for _ in range(pubs)),
                           dlq=(dlq(1),) if in_dlq else ())
        ledger = classify(s, obs, [Replay(pid(1), "d", "m")] if replayed else [])
        if not ledger.entries:
            assert not (was_sent or rows or pubs or in_dlq or replayed)
            continue
        strays = [x for x in ledger.entries if x.provider_id.startswith("?:")]
        if strays:  # a publication nothing else accounts for: matched by external id only
            assert not was_sent and rows == 0 and pubs > 0
            assert strays[0].verdict == ("duplicated" if pubs > 1 else "unexpected")
        mine = [x for x in ledger.entries if x.provider_id == pid(1)]
        if not mine:
            continue
        (e,) = mine
        pubs = pubs if not strays else 0
        if rows > 1 or pubs > 1:
            assert e.verdict == "duplicated"
        elif e.verdict in ("ok", "recovered"):
            assert was_sent and rows == 1 and pubs == 1
            assert (e.verdict == "recovered") == replayed
        elif e.verdict == "unexpected":
            assert not was_sent
        elif e.verdict == "unknown":
            assert outcome == "unknown" and rows == pubs == 0 and not in_dlq
        assert sum(ledger.counts()[v] for v in ("ok", "lost", "duplicated", "unexpected", "recovered",
                                                 "unknown")) == len(ledger.entries) == 1 + len(strays)


def test_mixed_run_counts_and_verdict() -> None:
    s = [sent(i) for i in range(10)] + [sent(10, outcome="unknown")]
    obs = Observations(
        rows=(*(row(i) for i in range(8)), row(3), row(99)),  # 8,9 lost; 3 stored twice; 99 never sent
        publications=(*(pub(i) for i in range(8)), pub(99)),
        dlq=(dlq(9),),
    )
    ledger = classify(s, obs)
    assert ledger.counts() == {"ok": 7, "lost": 2, "duplicated": 1, "unexpected": 1, "recovered": 0, "unknown": 1,
                               "undelivered": 0, "total": 12}
    assert ledger.lost == 2 and ledger.duplicated == 1 and ledger.unexpected == 1 and ledger.unknown == 1
    assert not ledger.passed
    assert ledger.summary().startswith("FAIL")
    assert {e.provider_id for e in ledger.by_verdict("lost")} == {pid(8), pid(9)}
    lost9 = next(e for e in ledger.entries if e.provider_id == pid(9))
    assert lost9.in_dlq and "DLQ" in lost9.detail


def test_clean_run_passes_and_unknowns_do_not_fail_it() -> None:
    s = [sent(i) for i in range(5)] + [sent(5, outcome="unknown")]
    obs = Observations(rows=tuple(row(i) for i in range(5)), publications=tuple(pub(i) for i in range(5)))
    ledger = classify(s, obs)
    assert ledger.passed and ledger.ok == 5 and ledger.unknown == 1
    assert ledger.summary().startswith("PASS")


def test_retried_publish_of_one_message_is_one_entry() -> None:
    s = [sent(1, outcome="unknown", at=99.0), sent(1, at=100.0)]
    ledger = classify(s, Observations(rows=(row(1),), publications=(pub(1),)))
    (e,) = ledger.entries
    assert e.verdict == "ok" and e.sent == 2 and e.accepted and e.sent_at == 99.0


def test_publication_of_an_unstored_message_is_matched_through_the_sent_id() -> None:
    ledger = classify([sent(4)], Observations(publications=(pub(4),)))
    assert one(ledger)[0] == "lost"
    stray = classify([sent(4)], Observations(rows=(row(4),), publications=(pub(4), Publication("c:9", "ZZZ"))))
    assert stray.counts()["unexpected"] == 1 and stray.ok == 1


def test_frame_has_latencies() -> None:
    ledger = classify([sent(1, at=100.0)], Observations(rows=(row(1, created=100.25, published=100.5),),
                                                         publications=(pub(1),)))
    df = ledger.frame()
    assert list(df["verdict"]) == ["ok"]
    assert df["commit_ms"].iloc[0] == pytest.approx(250.0)
    assert df["realtime_ms"].iloc[0] == pytest.approx(500.0)
    assert len(classify([], Observations()).frame()) == 0


def test_rows_from_store_keeps_only_the_load_owners() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, tzinfo=UTC)
    raw = [{"provider_id": pid(1), "external_id": "ID0001", "conversation_id": 3, "created_at": t,
            "published_at": None},
           {"provider_id": "5599:OTHER", "external_id": "OTHER", "conversation_id": 4, "created_at": t,
            "published_at": t}]
    (r,) = rows_from_store(raw, {pid(2)})
    assert r.provider_id == pid(1) and r.created_at == t.timestamp() and r.published_at is None
    assert len(rows_from_store(raw)) == 2


def test_provider_id_of() -> None:
    assert provider_id_of(b'{"message": {"id": "o:X"}}') == "o:X"
    for bad in (b"not json", b"[]", b'{"message": {}}', b'{"message": "x"}', b'{"message": {"id": ""}}'):
        assert provider_id_of(bad) is None


# -- statistics and plots -----------------------------------------------------------------------------------------

def test_percentiles_match_numpy() -> None:
    import numpy as np

    values = [float(v) for v in (5, 1, 9, 3, 7, 2, 8, 100, 4, 6)]
    st = latency_stats([*values, None, math.nan])
    assert st.n == 10
    for q, got in ((0.5, st.p50), (0.95, st.p95), (0.99, st.p99)):
        assert got == pytest.approx(float(np.percentile(values, q * 100)))
    assert st.max == 100.0
    assert latency_stats([]).n == 0 and math.isnan(latency_stats([]).p99)
    assert percentile([1.0], 0.99) == 1.0
    with pytest.raises(ValueError, match="quantile"):
        percentile([1.0], 1.5)


def test_throughput_buckets_keep_gaps() -> None:
    assert throughput([10.0, 10.2, 10.9, 13.1, None]) == [(0.0, 3), (1.0, 0), (2.0, 0), (3.0, 1)]
    assert throughput([]) == []
    with pytest.raises(ValueError):
        throughput([1.0], bucket_s=0)


def test_plots_return_figures() -> None:
    from matplotlib.figure import Figure

    s = [sent(i, at=100.0 + i * 0.01) for i in range(50)]
    obs = Observations(rows=tuple(row(i, created=100.2 + i * 0.01, published=100.3 + i * 0.01) for i in range(50)),
                       publications=tuple(pub(i) for i in range(50)))
    df = classify(s, obs).frame()
    for fig in (plot_throughput(df, bucket_s=0.1), plot_latency(df)):
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
    assert isinstance(plot_latency(classify([], Observations()).frame()), Figure)
