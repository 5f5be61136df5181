"""The PRD's acceptance criteria (section 13), judged from what the phases of a run recorded.

The seven criteria, in the PRD's order and words (Portuguese, with an English gloss), each judged from the phases'
``results.json`` (:func:`judge`): a verdict (``pass``, ``fail``, or ``no evidence`` when the phase that proves it did
not run or only dry-ran, as in cloud mode without confirmation), the evidence as one sentence, and the figures it rests
on. Phase 90 records these rows; the run's ``index.html`` and ``run.json`` show them as the acceptance table.

In cloud mode phase 30 runs the cloud-safe fault scenarios only; each offline-only one is listed with the offline run
that proved it (:func:`offline_proofs`: the newest recorded offline phase 30 in which it passed), which the "no data
loss on failure" evidence names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whatrack.runs.record import RESULTS_FILE, criterion, lab_root, phase_dir

log = logging.getLogger("whatrack.runs.acceptance")

#: What phase 30 in cloud mode says of an offline-only scenario no offline run has proved yet.
NOT_PROVED = "not yet proved offline: run `whatrack run 30` offline"

#: The PRD's section 13, in its order: (the PRD's text, an English gloss).
PRD_CRITERIA: tuple[tuple[str, str], ...] = (
    ("BullMQ funciona com Upstash Redis", "BullMQ works with Upstash Redis"),
    ("Follow-ups agendados funcionam", "Scheduled follow-ups work"),
    ("Webhook QStash recebido e validado", "QStash webhook received and validated"),
    ("Mensagens persistidas no banco", "Messages persisted in the database"),
    ("Atualização em tempo real (Centrifugo)", "Realtime update (Centrifugo)"),
    ("Logs disponíveis no Upstash Console", "Logs available in the Upstash Console"),
    ("Sem perda de dados em caso de falha", "No data loss on failure"),
)

Results = Mapping[str, Mapping[str, Any]]
Judgement = tuple[bool | None, str, dict[str, Any]]


def _phase(results: Results, number: str) -> Mapping[str, Any] | None:
    """The results of phase ``number`` (``"10"`` finds ``10_redis_migration``), or None when it did not run."""
    for name, res in results.items():
        if name.split("_", 1)[0] == number:
            return res
    return None


def _ms(p: Mapping[str, Any] | None, key: str) -> str:
    v = (p or {}).get(key)
    return f"{v:.0f} ms" if isinstance(v, int | float) and v == v else "n/a"


def _bullmq(results: Results) -> Judgement:
    moved, prep = _phase(results, "10"), _phase(results, "00")
    if moved is None:
        return None, "phase 10 did not run", {}
    if moved.get("dry_run") or moved.get("passed") is None:
        return None, f"phase 10 was a dry run: {moved.get('why', 'nothing copied')}", {}
    workers = moved.get("workers") or {}
    if not workers:  # copied and verified, but no worker ran there (cloud: the production workers do)
        return None, f"no worker ran on the target in this run ({moved.get('verify', '')})", {}
    py, node = workers.get("python") or {}, workers.get("node") or {}
    figures = {"python_jobs": py.get("completed"), "python_jobs_per_s": py.get("jobs_per_s"),
               "node_jobs": node.get("completed"), "node_jobs_per_s": node.get("jobs_per_s"),
               "node": node.get("status", "not run")}
    node_ok = node.get("status") == "absent" or bool(node.get("passed"))
    probe_ok = prep is None or prep.get("passed") is not False
    passed = bool(moved.get("passed")) and bool(py.get("passed")) and node_ok and probe_ok
    if node.get("status") == "absent":
        node_text = f"node absent: Python worker only ({node.get('reason', 'no node')})"
    elif node:
        node_text = (f"Node BullMQ worker: {node.get('completed')}/{node.get('jobs')} jobs, "
                     f"{node.get('jobs_per_s')} jobs/s")
    else:
        node_text = "Node BullMQ worker: not run"
    probe = (prep.get("checks") or [{}])[-1].get("evidence", "") if prep else "phase 00 did not run"
    evidence = (f"after the copy to the TLS target ({moved.get('verify', '')}): Python worker "
                f"{py.get('completed')}/{py.get('jobs')} jobs, {py.get('jobs_per_s')} jobs/s; {node_text}; "
                f"probe: {probe}")
    return passed, evidence, figures


def _followups(results: Results) -> Judgement:
    moved = _phase(results, "10")
    if moved is None:
        return None, "phase 10 did not run", {}
    fu = moved.get("followups")
    if moved.get("dry_run") or not fu:
        return None, f"no follow-up ran on the target ({moved.get('why', 'phase 10 dry run')})", {}
    late = fu.get("lateness") or {}
    figures = {k: fu.get(k) for k in ("jobs", "delayed", "fired", "sent_once", "sent_twice", "never_sent",
                                      "stored_outbound", "published")}
    figures |= {"lateness_p50_ms": late.get("p50_ms"), "lateness_p99_ms": late.get("p99_ms")}
    evidence = (f"{fu.get('fired')}/{fu.get('jobs')} jobs fired on the target ({fu.get('delayed')} delayed), "
                f"lateness p50 {_ms(late, 'p50_ms')}, p99 {_ms(late, 'p99_ms')}; sent once through UAZAPI "
                f"{fu.get('sent_once')}, twice {fu.get('sent_twice')}, never {fu.get('never_sent')}; "
                f"stored as outbound {fu.get('stored_outbound')}, published {fu.get('published')}")
    return bool(fu.get("passed")), evidence, figures


def _webhook(results: Results) -> Judgement:
    path = _phase(results, "20")
    if path is None:
        return None, "phase 20 did not run", {}
    sig = path.get("signatures") or {}
    figures = {k: sig.get(k) for k in sig if not isinstance(sig.get(k), list | dict)}
    evidence = "; ".join(c["evidence"] for c in path.get("checks", []))
    if not path.get("passed"):
        return False, evidence, figures
    refused = [sig.get(k) for k in ("unsigned", "forged", "expired")]
    if refused != [401, 401, 401]:
        return False, f"{evidence}; refusals unsigned/forged/expired: {refused} (401 each expected)", figures
    if sig.get("next_key") is None:
        return None, f"{evidence}; key rotation not tested (cloud mode posts nothing with the next key)", figures
    return sig.get("next_key") == 200, evidence, figures


def _persisted(results: Results) -> Judgement:
    load = _phase(results, "30")
    if load is None or not load.get("ledger"):
        return None, "phase 30 did not run", {}
    ledger, summary = load["ledger"], load.get("load") or {}
    stored = ledger.get("ok", 0) + ledger.get("recovered", 0)
    accepted = summary.get("accepted", ledger.get("total"))
    passed = ledger.get("lost") == 0 and ledger.get("duplicated") == 0 and ledger.get("unexpected", 0) == 0 \
        and stored == accepted
    path = _phase(results, "20")
    fixtures = (f"; phase 20: {len([f for f in path.get('fixtures', []) if f.get('stored')])} fixtures stored"
                if path else "")
    figures = {"accepted": accepted, "stored_once": stored, **{k: ledger.get(k) for k in
                                                               ("lost", "duplicated", "unexpected", "unknown")},
               "stored_per_s": summary.get("stored_per_s"), "commit_p99_ms": summary.get("commit_p99_ms")}
    evidence = (f"{stored} of {accepted} accepted deliveries reconciled to exactly one row each (ledger: "
                + ", ".join(f"{k} {v}" for k, v in ledger.items()) + f"); commit p50 "
                f"{summary.get('commit_p50_ms')} ms, p99 {summary.get('commit_p99_ms')} ms{fixtures}")
    return passed, evidence, figures


def _realtime(results: Results) -> Judgement:
    load = _phase(results, "30")
    if load is None:
        return None, "phase 30 did not run", {}
    sub = load.get("subscriber")
    if not sub:
        return None, load.get("subscriber_verdict") or "no WebSocket subscriber ran", {}
    lat = sub.get("latency") or {}
    figures = {k: sub.get(k) for k in ("expected", "deliveries", "channels", "missing", "duplicated", "unexpected",
                                       "recovered", "live")}
    figures |= {"latency_p50_ms": lat.get("p50_ms"), "latency_p99_ms": lat.get("p99_ms")}
    evidence = ("centrifuge-python over WebSocket (connection + subscription tokens): "
                + str(load.get("subscriber_verdict") or sub))
    return bool(sub.get("passed")), evidence, figures


def _logs(results: Results) -> Judgement:
    load = _phase(results, "30")
    if load is None:
        return None, "phase 30 did not run", {}
    ql = load.get("qstash_logs")
    if not ql:
        return None, "QStash's logs were not read", {}
    figures = {k: ql.get(k) for k in ("messages", "found", "missing", "unexpected", "unknown", "events")}
    figures |= {"states": ql.get("states"), "dlq": len(ql.get("dlq") or [])}
    dlq = "; ".join(f"{d.get('provider_id')}: {d.get('reason')}" for d in (ql.get("dlq") or [])[:5])
    evidence = f"client.log.list: {ql.get('summary')}" + (f"; DLQ: {dlq}" if dlq else "")
    return bool(ql.get("passed")), evidence, figures


def _no_loss(results: Results) -> Judgement:
    load, back = _phase(results, "30"), _phase(results, "40")
    faults = (load or {}).get("faults") or []
    if not faults:
        return None, "no fault scenario ran (phase 30's faults=...; in cloud mode the cloud-safe ones)", {}
    figures: dict[str, Any] = {f["scenario"]: {"lost": f.get("lost"), "duplicated": f.get("duplicated"),
                                                "recovered": f.get("recovered")} for f in faults}
    clean = all(f.get("passed") and not f.get("lost") and not f.get("duplicated") for f in faults)
    evidence = "; ".join(f"{f['scenario']}: {f.get('ok', 0)} ok, {f.get('recovered', 0)} recovered, "
                         f"{f.get('lost', 0)} lost, {f.get('duplicated', 0)} duplicated" for f in faults)
    listed = (load or {}).get("faults_offline_only") or []
    if listed:  # cloud mode: not run here, each named with the offline run that proved it
        figures["offline_only"] = {r["scenario"]: r.get("proved_by") for r in listed}
        evidence += "; offline only, not run in this (cloud) run: " + ", ".join(
            f"{r['scenario']} ({r.get('evidence')})" for r in listed)
    rollback_ok = True
    if back is not None and back.get("passed") is not None:
        rollback_ok = bool(back.get("passed"))
        figures["rollback"] = "pass" if rollback_ok else "fail"
        evidence += f"; rollback: {back.get('rollback', back.get('passed'))}"
    return clean and rollback_ok, evidence, figures


_JUDGES: tuple[Callable[[Results], Judgement], ...] = (_bullmq, _followups, _webhook, _persisted, _realtime, _logs,
                                                        _no_loss)


def judge(results: Results) -> list[dict[str, Any]]:
    """The seven acceptance rows, in the PRD's order: each ``{"criterion", "gloss", "number", "verdict",
    "evidence", "figures"}`` (``criterion`` is the PRD's text)."""
    rows = []
    for n, ((pt, en), fn) in enumerate(zip(PRD_CRITERIA, _JUDGES, strict=True), start=1):
        passed, evidence, figures = fn(results)
        rows.append(criterion(pt, passed, evidence) | {"number": n, "gloss": en, "figures": figures})
    return rows


# -- offline proofs of the offline-only fault scenarios ---------------------------------------------------------------

def runs_root() -> Path:
    """The directory holding the runs: the current run's parent inside a ``whatrack run`` kernel, else the one that
    holds the ``lab`` results (``runs/`` of the repository)."""
    here = phase_dir()
    return here.parent.parent if here is not None else lab_root().parent


def _recorded_at(res: Mapping[str, Any]) -> datetime | None:
    try:
        at = datetime.fromisoformat(str(res.get("recorded")))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # times.iso writes UTC


def offline_proofs(names: Iterable[str], runs_dir: Path | None = None) -> dict[str, dict[str, Any] | None]:
    """For each fault scenario of ``names``, the newest recorded offline phase 30 in which it passed: ``{"run": run
    id (``lab`` for JupyterLab), "recorded": ISO time, "messages", "lost", "duplicated"}``, or None when no offline
    run proved it. A run's mode is its phase 30's ``mode``, else its ``run.json``'s; a record of unknown mode or
    that does not read is skipped (with a log line for the latter).

    Args:
        runs_dir: where the runs are (default :func:`runs_root`).
    """
    wanted = list(names)
    found: dict[str, tuple[datetime, dict[str, Any]]] = {}
    root = runs_dir or runs_root()
    for path in sorted(root.glob(f"*/30_*/{RESULTS_FILE}")):
        run = path.parent.parent
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
            mode = res.get("mode")
            if mode is None and (run / "run.json").is_file():
                mode = json.loads((run / "run.json").read_text(encoding="utf-8")).get("mode")
        except (OSError, ValueError) as e:
            log.info("skipped %s: %s", path, e)
            continue
        at = _recorded_at(res)
        if mode != "offline" or at is None:
            continue
        for row in res.get("faults") or []:
            name = row.get("scenario")
            if name in wanted and row.get("passed") and (name not in found or at > found[name][0]):
                found[name] = (at, {"run": run.name, "recorded": res.get("recorded"), "messages": row.get("messages"),
                                    "lost": row.get("lost"), "duplicated": row.get("duplicated")})
    return {n: found[n][1] if n in found else None for n in wanted}


def offline_only_rows(scenarios: Iterable[tuple[str, str]], runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """Phase 30's cloud-mode listing: one row per offline-only scenario (``(name, description)`` pairs), each with the
    offline run that proved it (``proved_by``, None when none did) and one sentence of evidence."""
    pairs = list(scenarios)
    proofs = offline_proofs([n for n, _ in pairs], runs_dir)
    rows = []
    for name, description in pairs:
        proof = proofs[name]
        evidence = (f"proved offline in run {proof['run']} (recorded {proof['recorded']}: {proof['messages']} "
                    f"messages, {proof['lost']} lost, {proof['duplicated']} duplicated)" if proof else NOT_PROVED)
        rows.append({"scenario": name, "status": "offline only", "description": description,
                     "proved_by": proof["run"] if proof else None, "evidence": evidence})
    return rows
