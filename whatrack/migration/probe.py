"""Probe a target Redis before a migration: what it accepts, what would break BullMQ, what the copy must do.

Every check is one :class:`Finding` with status pass / warn / block / unknown. A managed service may refuse
commands (CONFIG, some INFO sections, DEBUG): a refused check is *unknown* with what that means, never a crash.
"""

from __future__ import annotations

import logging
import socket
import ssl
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import redis

from whatrack import redis_tcp
from whatrack.migration.keys import OWN_PREFIX, is_upstash_host, url_db
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.migration.probe")

Status = Literal["pass", "warn", "block", "unknown"]

#: PINGs whose median is the latency figure: enough to smooth one slow packet, few enough to be instant.
PINGS = 20
#: Above this round trip a Python BullMQ worker is capped near 1/(2·RTT) jobs/s (protocols/bullmq.md §3): warn.
SLOW_RTT_MS = 50.0
#: A certificate expiring sooner than this gets a warning.
CERT_WARN_DAYS = 14


@dataclass(frozen=True)
class Finding:
    """One probe result: which check, its status and what it means."""

    check: str
    status: Status
    detail: str


@dataclass
class ProbeReport:
    """All findings of one probe, in order. ``blocking`` lists the blockers; ``dump_compatible`` drives ``auto``."""

    target: str
    findings: list[Finding] = field(default_factory=list)
    dump_compatible: bool | None = None
    version: str | None = None

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "block"]

    @property
    def ok(self) -> bool:
        return not self.blocking

    @property
    def verdict(self) -> str:
        counts = {s: sum(f.status == s for f in self.findings) for s in ("pass", "warn", "block", "unknown")}
        head = "BLOCKED" if self.blocking else "READY"
        why = "; ".join(f"{f.check}: {f.detail}" for f in self.blocking)
        return (f"probe {head} for {self.target}: {counts['pass']} pass, {counts['warn']} warn, "
                f"{counts['block']} block, {counts['unknown']} unknown" + (f" ({why})" if why else ""))

    def to_rows(self) -> list[dict[str, str]]:
        return [{"check": f.check, "status": f.status, "detail": f.detail} for f in self.findings]

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.to_rows(), columns=["check", "status", "detail"])

    def add(self, check: str, status: Status, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))


def _refused(e: Exception) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("unknown command", "not allowed", "noperm", "disabled", "unsupported",
                                  "not supported", "no permissions"))


def probe(target_url: str, *, ca_bundle: str | None = None, source_url: str | None = None) -> ProbeReport:
    """Probe ``target_url`` (and, with ``source_url``, whether the two servers' DUMP formats are compatible).

    Never raises for a refused command or a failed check: each becomes a finding.
    """
    rep = ProbeReport(target=mask_url(target_url) or "")
    parts = urlsplit(target_url)
    host = parts.hostname or ""
    if parts.scheme == "redis":
        if is_upstash_host(target_url):
            rep.add("tls", "block", "plain redis:// to an Upstash host would send the password in clear and is "
                    "refused by Upstash; use rediss://")
            rep.add("connect", "unknown", "not attempted over plain TCP to an Upstash host")
            return rep
        loop = host in ("localhost", "::1") or host.startswith("127.")
        rep.add("tls", "warn" if loop else "block",
                "plain TCP on loopback (offline stack only)" if loop else
                "plain TCP to a remote host: use rediss:// so TLS protects the password and the data")
    db = url_db(target_url)
    rep.add("database", "pass" if db == 0 else "block",
            "database 0" if db == 0 else f"URL selects database {db}; Upstash has database 0 only: use /0")
    try:
        client = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle, socket_timeout=10)
        client.ping()
    except redis.RedisError as e:
        status: Status = "block"
        rep.add("connect", status, f"cannot connect: {_safe(e, target_url)}")
        return rep
    try:
        if parts.scheme == "rediss":
            rep.add("tls", "pass", "TLS with certificate and host name verified" + _cert_expiry(rep, parts, ca_bundle))
        rep.add("connect", "pass", "connected and authenticated")
        _version(rep, client)
        _lua(rep, client)
        _eviction(rep, client)
        _dump(rep, client, source_url, ca_bundle)
        _latency(rep, client)
    finally:
        client.close()
    log.debug("%s", rep.verdict)  # the caller prints it: said once
    return rep


def _safe(e: Exception, url: str) -> str:
    text = str(e)
    pw = urlsplit(url).password
    return text.replace(pw, "********") if pw else text


def _cert_expiry(rep: ProbeReport, parts: Any, ca_bundle: str | None) -> str:
    try:
        ctx = ssl.create_default_context(cafile=ca_bundle)
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            cert = tls.getpeercert() or {}
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(cert["notAfter"])), UTC)
    except (OSError, ValueError, KeyError):
        return ""
    days = (not_after - datetime.now(UTC)).days
    if days < CERT_WARN_DAYS:
        rep.add("certificate", "warn", f"server certificate expires in {days} days ({not_after:%Y-%m-%d})")
    return f"; certificate valid until {not_after:%Y-%m-%d}"


def _version(rep: ProbeReport, client: redis.Redis) -> None:
    try:
        info = client.info("server")
    except redis.ResponseError as e:
        rep.add("version", "unknown", f"INFO server refused ({e}); BullMQ will assume a modern server")
        return
    v = str(info.get("redis_version", "?"))
    rep.version = v
    try:
        major_minor = tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        rep.add("version", "unknown", f"server reports version {v!r}, not x.y.z; BullMQ's checks may fail")
        return
    if major_minor < (5, 0):
        rep.add("version", "block", f"Redis {v}: BullMQ needs at least 5.0")
    elif major_minor < (6, 2):
        rep.add("version", "warn", f"Redis {v}: BullMQ recommends at least 6.2")
    else:
        rep.add("version", "pass", f"Redis {v}")


def _lua(rep: ProbeReport, client: redis.Redis) -> None:
    try:
        ok = client.eval("return 1", 0)
        rep.add("lua", "pass" if ok == 1 else "block", "EVAL runs Lua scripts" if ok == 1 else f"EVAL returned {ok}")
    except redis.ResponseError as e:
        rep.add("lua", "block", f"EVAL refused ({e}); BullMQ runs every operation as a Lua script")


def _eviction(rep: ProbeReport, client: redis.Redis) -> None:
    policy: str | None = None
    how = "CONFIG GET"
    try:
        got: Any = client.config_get("maxmemory-policy")
        policy = str(got.get("maxmemory-policy") or got.get(b"maxmemory-policy") or "") or None
    except redis.ResponseError as e:
        rep.add("config", "unknown", f"CONFIG GET refused ({e}), as managed services do: settings only CONFIG "
                "shows cannot be checked here; check them in the provider's console")
        how = "INFO memory"
        try:
            policy = str(client.info("memory").get("maxmemory_policy") or "") or None
        except redis.ResponseError:
            policy = None
    if policy is None:
        rep.add("eviction", "unknown", "CONFIG and INFO memory refused: check in the provider's console that "
                "eviction is off (noeviction), or BullMQ job keys may be evicted")
    elif policy == "noeviction":
        rep.add("eviction", "pass", f"maxmemory-policy noeviction (from {how})")
    else:
        rep.add("eviction", "block", f"maxmemory-policy {policy}: the server may evict BullMQ job keys and lose "
                "jobs; set noeviction (on Upstash: turn eviction off)")


def _dump(rep: ProbeReport, client: redis.Redis, source_url: str | None, ca_bundle: str | None) -> None:
    name = OWN_PREFIX + b"probe:" + uuid.uuid4().hex.encode()
    src = redis_tcp.connect_sync(source_url, ca_bundle=ca_bundle, socket_timeout=10) if source_url else client
    try:
        src.set(name, b"whatrack probe", px=60_000)  # expires by itself if the probe dies before DEL
        payload: Any = src.dump(name)
        src.delete(name)
    except redis.RedisError as e:
        rep.add("dump", "unknown" if _refused(e) else "warn", f"DUMP on the source failed ({e}): logical copy")
        rep.dump_compatible = False
        return
    finally:
        if src is not client:
            src.close()
    tmp = name + b":restored"
    try:
        client.restore(tmp, 60_000, payload, replace=True)
        same = client.get(tmp) == b"whatrack probe"
        client.delete(tmp)
    except redis.ResponseError as e:
        rep.dump_compatible = False
        why = "refused" if _refused(e) else "payload format incompatible"
        rep.add("dump", "warn", f"RESTORE of a source DUMP {why} ({e}): the copy will use the logical path")
        return
    rep.dump_compatible = same and source_url is not None
    if source_url is None:
        rep.add("dump", "pass", "DUMP and RESTORE accepted (no source given: format compatibility not checked)")
    else:
        rep.add("dump", "pass" if same else "warn", "source DUMP restores on the target: DUMP/RESTORE copy"
                if same else "restored value differs: the copy will use the logical path")


def _latency(rep: ProbeReport, client: redis.Redis) -> None:
    samples = []
    for _ in range(PINGS):
        t = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - t) * 1000)
    med = statistics.median(samples)
    if med > SLOW_RTT_MS:
        rep.add("latency", "warn", f"median round trip {med:.2f} ms over {PINGS} PINGs: a Python BullMQ worker "
                f"is capped near {1000 / (2 * med):.0f} jobs/s; run several or pool the client")
    else:
        rep.add("latency", "pass", f"median round trip {med:.2f} ms over {PINGS} PINGs")
