"""No secret leaves the process: known secret values are planted in the settings (signing keys, Centrifugo key,
database and Redis passwords, QStash and REST tokens) and in the payloads (instance tokens); then the whole webhook
path runs, failures included (forged signatures, poison, unknown instance, database down, Centrifugo down, body too
large), and every log line (DEBUG, all loggers), response (status, headers, body), ``/metrics`` sample, error message
and repr produced is searched for them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from adversarial_support import CENT_KEY, CURRENT, NEXT, ROTATED_OUT, fresh_endpoint

from whatrack.devstack import servers
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.errors import ConfigError
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.webhook.app import create_app

DB_PASSWORD = "pgPw-Planted-9a8b7c6d5e"
REDIS_PASSWORD = "redisPw-Planted-1q2w3e4r"
QSTASH_TOKEN = "qstashTok-Planted-5t6y7u8i"
REST_TOKEN = "restTok-Planted-9o0p1a2s"
UAZAPI_ADMIN = "uazAdmin-Planted-3d4f5g6h"
UNKNOWN_INSTANCE_TOKEN = "instTok-Planted-unknown-7j8k9l"
SETTINGS_SECRETS = [CURRENT, NEXT, CENT_KEY, DB_PASSWORD, REDIS_PASSWORD, QSTASH_TOKEN, REST_TOKEN, UAZAPI_ADMIN]


def _extra_env(db_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url, "UPSTASH_REDIS_URL": f"rediss://default:{REDIS_PASSWORD}@localhost:6390/0",
        "QSTASH_TOKEN": QSTASH_TOKEN, "QSTASH_URL": "http://127.0.0.1:9", "UPSTASH_REDIS_REST_URL": "http://127.0.0.1:9",
        "UPSTASH_REDIS_REST_TOKEN": REST_TOKEN, "UAZAPI_ADMIN_TOKEN": UAZAPI_ADMIN,
    }


def _with_password(libpq: str) -> str:
    """The test database's URL with a password in it (trust auth ignores it; the code must still never show it)."""
    return libpq.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@", 1)


class Evidence:
    """Everything the run produced that a person or a log pipeline could see."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.signatures: list[str] = []

    def response(self, r: httpx.Response) -> httpx.Response:
        self.texts.append(f"{r.status_code} {list(r.headers.items())!r} {r.text}")
        return r

    def leaks(self, secrets: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in secrets:
            hits = [t[max(0, t.find(s) - 60):t.find(s) + 20] for t in self.texts if s in t]
            if hits:
                out[s[:10] + "..."] = hits[:3]
        return out


async def _run_everything(url: str, base: str, fixtures: Path, ev: Evidence, sign_with: Callable[..., str]) -> None:
    good = (fixtures / "messages_inbound_text.json").read_bytes()
    instance_token = json.loads(good)["token"]
    unknown = json.loads(good)
    unknown["token"] = UNKNOWN_INSTANCE_TOKEN
    unknown_body = json.dumps(unknown).encode()
    long_track = json.loads(good)
    long_track["message"].update(messageid="LEAKTEST1", id="5511999990000:LEAKTEST1", track_id="t" * 5000)
    cases: list[tuple[bytes, list[str]]] = [
        (good, [sign_with(good)]),
        (good, [sign_with(good)]),  # duplicate
        (good, [sign_with(good, ROTATED_OUT)]),
        (good, [sign_with(good, CURRENT, now=int(time.time()) - 900)]),
        (good, [sign_with(good, CURRENT, url="https://evil.example/x")]),
        (good.replace(b"Maria", b"Mario"), [sign_with(good)]),
        (good, [sign_with(good), sign_with(good, NEXT)]),
        (good, ["not.a.jwt"]),
        (good, [f"Bearer {CURRENT}"]),
        (good, []),
        (b'{"EventType": "messages", ', [sign_with(b'{"EventType": "messages", ')]),
        (unknown_body, [sign_with(unknown_body)]),
        (json.dumps(long_track).encode(), [sign_with(json.dumps(long_track).encode())]),
    ]
    async with httpx.AsyncClient(timeout=30) as c:
        for body, sigs in cases:
            ev.signatures += sigs
            ev.response(await c.post(url, content=body, headers=[("Upstash-Signature", s) for s in sigs]))
        ev.response(await c.post(url, content=b" " * (2 << 20), headers={"Upstash-Signature": sign_with(b"")}))
        ev.response(await c.get(f"{base}/metrics"))
        ev.response(await c.get(f"{base}/healthz"))
    ev.texts.append(instance_token)  # sentinel removed below: proves the search itself works
    assert Evidence.leaks(ev, [instance_token]) != {}
    ev.texts.pop()


async def test_no_secret_in_logs_responses_metrics_or_reprs(make_pg_database: Callable[[], str], redis_url: str,
                                                           fixtures_dir: Path, caplog: pytest.LogCaptureFixture,
                                                           pg_admin_url: str) -> None:
    caplog.set_level(logging.DEBUG)
    ev = Evidence()
    instance_token = json.loads((fixtures_dir / "messages_inbound_text.json").read_text())["token"]

    # 1. the healthy endpoint, every kind of delivery
    async with fresh_endpoint(pg_admin_url, redis_url, fixtures_dir) as ep:
        def s1(body: bytes, key: str = CURRENT, **kw: object) -> str:
            return sign(body, str(kw.pop("url", ep.url)), key, **kw)  # type: ignore[arg-type]

        await _run_everything(ep.url, ep.base, fixtures_dir, ev, s1)
        ev.texts += [repr(ep.settings), str(ep.settings), repr(ep.store), repr(dict(ep.settings))]

    # 2. database down (a password in its URL) and Centrifugo down (its key planted): 503s with their reasons
    dead_db, dead_cent = servers.free_port(), servers.free_port()
    port = servers.free_port()
    public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    libpq = _with_password(make_pg_database())
    for db in (f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{dead_db}/whatrack", libpq):
        env = {**_extra_env(db), "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
               "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": f"http://127.0.0.1:{dead_cent}/api",
               "CENTRIFUGO_API_KEY": CENT_KEY}
        settings = Settings.from_env(env, env_files=())
        if db == libpq:
            from whatrack.store.api import Store

            store = Store.from_url(settings.database_url or "")
            await store.upgrade()
            await store.register_instance("Acme", "whatrack-demo-01", instance_token, owner="5511999990000")
            ev.texts.append(repr(store))
            await store.aclose()
        async with serving(create_app(settings), port=port):
            def s2(body: bytes, key: str = CURRENT, **kw: object) -> str:
                return sign(body, str(kw.pop("url", public)), key, **kw)  # type: ignore[arg-type]

            await _run_everything(public, f"http://127.0.0.1:{port}", fixtures_dir, ev, s2)
        ev.texts += [repr(settings), repr(settings.masked())]
    statuses = " ".join(t.split(" ", 1)[0] for t in ev.texts if t[:3].isdigit())
    assert "503" in statuses and "200" in statuses and "401" in statuses and "489" in statuses and "413" in statuses

    # 3. configuration errors that hold a secret in the bad value
    for bad in ({"UPSTASH_REDIS_URL": f"http://default:{REDIS_PASSWORD}@host:6379"},
                {"DATABASE_URL": f"mysql://root:{DB_PASSWORD}@host/db"},
                {"QSTASH_TOKEN": f"{QSTASH_TOKEN} trailing"},
                {"LEGACY_REDIS_URL": f"redis://:{REDIS_PASSWORD}@"}):
        with pytest.raises(ConfigError) as e:
            Settings.from_env(bad, env_files=())
        ev.texts += [str(e.value), repr(e.value)]

    # everything logged (all loggers, DEBUG, tracebacks included)
    ev.texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert any("signature rejected" in r.getMessage() for r in caplog.records)  # the failures were logged
    secrets = [*SETTINGS_SECRETS, instance_token, UNKNOWN_INSTANCE_TOKEN, *{s for s in ev.signatures if len(s) > 20}]
    assert ev.leaks(secrets) == {}
