"""Preflight: every setting checked before anything runs, and every configured service asked for real.

:func:`settings_problems` (no I/O) validates each variable on its own, so that every malformed one is listed at once,
then lists the missing ones, each with an example; ``whatrack run`` calls it before any kernel starts.
:func:`stale_stack` recognises an environment that still points at a stopped devstack (after
``eval "$(whatrack stack env)"`` and ``whatrack stack down``). :func:`check_services` (phase 00) asks each configured
service whether it accepts our credentials: PostgreSQL (login and schema), QStash (the token, through its API, and
whether the signing keys are QStash's), Centrifugo (the API key), UAZAPI (each instance token), the target and
legacy Redis (password / ACL, TLS with the hint about ``WHATRACK_REDIS_CA_BUNDLE``). No message carries a secret.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from whatrack.errors import ConfigError, StoreError
from whatrack.settings import _ENV_NAMES, _EXAMPLES, Settings  # the one table of names and examples

log = logging.getLogger("whatrack.runs.preflight")

#: Every setting the phases use (phase 00's ``required="all"``).
REQUIRED = ("DATABASE_URL", "UPSTASH_REDIS_URL", "LEGACY_REDIS_URL", "QSTASH_TOKEN", "QSTASH_CURRENT_SIGNING_KEY",
            "QSTASH_NEXT_SIGNING_KEY", "WEBHOOK_PUBLIC_URL", "CENTRIFUGO_API_URL", "CENTRIFUGO_API_KEY")
TIMEOUT_S = 5.0
_CA_HINT = ("the server's certificate is not signed by a CA this machine trusts: set WHATRACK_REDIS_CA_BUNDLE to "
            "the CA file that signed it (offline: the devstack's tls/ca.pem)")


@dataclass(frozen=True)
class Problem:
    """One wrong or missing setting: ``severity`` is ``error`` (stops the run) or ``note`` (reported only)."""

    variable: str
    problem: str
    example: str | None = None
    severity: str = "error"

    def line(self) -> str:
        return f"{self.variable}: {self.problem}" + (f" (example: {self.variable}={self.example})"
                                                      if self.example else "")


def _merged(env: Mapping[str, str], env_files: Sequence[str | Path]) -> dict[str, str]:
    from dotenv import dotenv_values

    out: dict[str, str] = {}
    for f in env_files:
        if Path(f).is_file():
            out.update({k: v for k, v in dotenv_values(f).items() if v is not None})
    return out | dict(env)


def settings_problems(env: Mapping[str, str], required: Sequence[str] = REQUIRED, *,
                      env_files: Sequence[str | Path] = (".env",)) -> list[Problem]:
    """Every malformed setting of ``env`` (and the ``env_files``), then every missing one of ``required``."""
    merged = _merged(env, env_files)
    out: list[Problem] = []
    for name in (*_ENV_NAMES, "WHATRACK_MODE"):
        value = (merged.get(name) or "").strip()
        if not value:
            continue
        try:
            Settings.from_env({name: value}, env_files=())
        except ConfigError as e:
            out.append(Problem(e.variable, e.problem, e.example))
    bad = {p.variable for p in out}
    out += [Problem(n, "is not set", _EXAMPLES.get(n, "<value>"))
            for n in required if n not in bad and not (merged.get(n) or "").strip()]
    return out


def stale_stack(env: Mapping[str, str]) -> str | None:
    """One line when ``env`` points at a devstack (``WHATRACK_STACK_DIR``) that is not running, else None."""
    stack_dir = (env.get("WHATRACK_STACK_DIR") or "").strip()
    if not stack_dir:
        return None
    from whatrack.devstack.stack import Stack

    if Stack(Path(stack_dir)).is_up():
        return None
    return (f"the environment points at the devstack in {stack_dir} (WHATRACK_STACK_DIR, from "
            '`eval "$(whatrack stack env)"`), which is not running: start it with `whatrack stack up`, or open a '
            "shell without its variables so that `whatrack run` starts its own")


def problems_text(problems: Sequence[Problem]) -> str:
    errors = [p for p in problems if p.severity == "error"]
    return f"{len(errors)} setting(s) to fix, in the environment or .env: " + "; ".join(p.line() for p in errors)


def require_settings(env: Mapping[str, str], required: Sequence[str] = REQUIRED) -> None:
    """Raise, listing every wrong or missing setting at once (``whatrack run`` before any kernel starts).

    Raises:
        ConfigError: ``variable`` is the first name; the message lists them all, each with an example.
    """
    problems = settings_problems(env, required)
    if problems:
        raise ConfigError(problems[0].variable if len(problems) == 1 else "settings", problems_text(problems))


# -- the services, asked for real -----------------------------------------------------------------------------------

def _database(s: Settings) -> list[Problem]:
    from whatrack.webhook.startup import check_database

    assert s.database_url
    if not s.database_url.startswith("postgresql"):
        return []
    try:
        check_database(s.database_url)
    except ConfigError as e:  # a schema behind is what `whatrack db upgrade` (and the phases' own upgrade) fixes
        behind = "whatrack db upgrade" in e.problem
        return [Problem(e.variable, e.problem, e.example, "note" if behind else "error")]
    except StoreError as e:
        return [Problem("DATABASE_URL", str(e).removeprefix("DATABASE_URL: "))]
    return []


def _qstash(s: Settings) -> list[Problem]:
    from qstash import QStash

    from whatrack.webhook.startup import check_signing_keys

    out: list[Problem] = []
    if s.qstash_current_signing_key or s.qstash_next_signing_key:
        try:
            check_signing_keys(s)
        except ConfigError as e:
            out.append(Problem(e.variable, e.problem, e.example))
    if not s.qstash_token:
        return out
    client = QStash(s.qstash_token.reveal(), base_url=s.qstash_url)
    try:
        keys = client.signing_key.get()
    except Exception as e:  # QStashError (401: a wrong token) or a transport error
        text = str(e).lower()
        refused = "401" in text or "unauthorized" in text or "invalid" in text
        what = "QStash refused the token" if refused else f"QStash at {s.qstash_url} did not answer"
        return [*out, Problem("QSTASH_TOKEN", f"{what} ({type(e).__name__})", _EXAMPLES["QSTASH_TOKEN"])]
    finally:
        client.http._client.close()  # the SDK has no close(); its httpx client does
    mine = {"QSTASH_CURRENT_SIGNING_KEY": s.qstash_current_signing_key, "QSTASH_NEXT_SIGNING_KEY":
            s.qstash_next_signing_key}
    theirs = {"QSTASH_CURRENT_SIGNING_KEY": keys.current, "QSTASH_NEXT_SIGNING_KEY": keys.next}
    for name, value in mine.items():
        if value and value.reveal() != theirs[name] and name not in {p.variable for p in out}:
            out.append(Problem(name, "is not the key QStash signs with for this token: copy both keys again",
                               _EXAMPLES[name]))
    return out


def _centrifugo(s: Settings) -> list[Problem]:
    from cent import CentUnauthorizedError, Client, InfoRequest

    if not (s.centrifugo_api_url and s.centrifugo_api_key):
        return []
    client = Client(s.centrifugo_api_url, s.centrifugo_api_key.reveal(), timeout=TIMEOUT_S)
    try:
        client.info(InfoRequest())
    except CentUnauthorizedError:
        return [Problem("CENTRIFUGO_API_KEY", "Centrifugo refused the API key (401)", _EXAMPLES["CENTRIFUGO_API_KEY"])]
    except Exception as e:
        return [Problem("CENTRIFUGO_API_URL", f"Centrifugo did not answer the info call ({type(e).__name__})",
                        _EXAMPLES["CENTRIFUGO_API_URL"])]
    finally:
        client.close()
    return []


def _uazapi(s: Settings) -> list[Problem]:
    import httpx

    if not (s.uazapi_base_url and s.uazapi_instance_tokens):
        return []
    out: list[Problem] = []
    with httpx.Client(base_url=s.uazapi_base_url, timeout=TIMEOUT_S) as c:
        for name, token in s.uazapi_instance_tokens:
            try:
                status = c.get("/instance/status", headers={"token": token.reveal()}).status_code
            except httpx.HTTPError as e:
                return [Problem("UAZAPI_BASE_URL", f"UAZAPI did not answer ({type(e).__name__})",
                                _EXAMPLES["UAZAPI_BASE_URL"])]
            if status in (401, 403):
                out.append(Problem("UAZAPI_INSTANCE_TOKENS", f"UAZAPI refused the token of instance {name!r} "
                                   f"({status})", _EXAMPLES["UAZAPI_INSTANCE_TOKENS"]))
    return out


def _redis_problem(name: str, url: str, ca_bundle: str | None) -> Problem | None:
    import redis

    from whatrack.redis_tcp import connect_sync

    client = connect_sync(url, ca_bundle=ca_bundle, socket_timeout=TIMEOUT_S)
    try:
        client.ping()
        try:
            client.acl_whoami()
        except redis.ResponseError:
            pass  # a server without ACL (or a restricted user) still serves BullMQ
    except redis.AuthenticationError:
        return Problem(name, "Redis refused the user name / password (AUTH)", _EXAMPLES.get(name))
    except redis.ConnectionError as e:
        cause = e.__cause__ or e.__context__
        text = f"{e} {cause}"
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return Problem(name, _CA_HINT, None)
        return Problem(name, f"Redis did not answer ({type(e).__name__})", _EXAMPLES.get(name))
    except redis.ResponseError as e:
        if "NOPERM" in str(e) or "NOAUTH" in str(e):
            return Problem(name, f"Redis refused the command: {str(e)[:120]}", _EXAMPLES.get(name))
    finally:
        client.close()
    return None


def _redis(s: Settings) -> list[Problem]:
    out = []
    for name, url in (("UPSTASH_REDIS_URL", s.upstash_redis_url), ("LEGACY_REDIS_URL", s.legacy_redis_url)):
        if url:
            p = _redis_problem(name, url, s.redis_ca_bundle)
            if p:
                out.append(p)
    return out


CHECKS: dict[str, Callable[[Settings], list[Problem]]] = {
    "database": _database, "qstash": _qstash, "centrifugo": _centrifugo, "uazapi": _uazapi, "redis": _redis}


def check_services(settings: Settings) -> list[Problem]:
    """Ask every configured service whether it accepts the settings; every problem found, none raised."""
    out: list[Problem] = []
    for name, check in CHECKS.items():
        try:
            out += check(settings)
        except Exception as e:  # a check's own failure is a finding too, never the end of the others
            log.warning("preflight check %s failed: %s", name, type(e).__name__)
            out.append(Problem(name, f"could not be checked ({type(e).__name__})"))
    return out


def table(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Rows for a notebook table (no secret in any field)."""
    return [asdict(p) | {"fix": p.line()} for p in problems]
