"""The store's commands: ``whatrack instances add|list``, ``whatrack leads`` and ``whatrack db upgrade``.

A token is never a command-line value (it would land in the shell history and in ``ps``): ``instances add`` reads
it from the environment variable named by ``--token-env``, else from a hidden prompt, else from one line of stdin.
Only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from whatrack.errors import ConfigError
from whatrack.settings import Settings
from whatrack.store.api import Store

T = TypeVar("T")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _with_store(fn: Callable[[Store], Awaitable[T]]) -> T:
    settings = Settings.from_env()
    settings.require("DATABASE_URL")
    assert settings.database_url

    async def main() -> T:
        store = Store.from_url(settings.database_url or "", pool_size=2)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def read_token(env_name: str | None, environ: dict[str, str] | None = None) -> str:
    """The instance token from ``$env_name``, else a hidden prompt (a terminal), else one line of stdin.

    Raises:
        ConfigError: the variable is unset or empty, or nothing was typed.
    """
    import os

    if env_name:
        if not _ENV_NAME.fullmatch(env_name):
            # Never echo it: a value that is not a variable name may well be the token itself.
            raise ConfigError("--token-env", "must be the NAME of an environment variable holding the token "
                                             "(letters, digits, _), not the token", "UAZAPI_INSTANCE_TOKEN")
        value = (os.environ if environ is None else environ).get(env_name, "").strip()
        if not value:
            raise ConfigError(env_name, "is not set or empty; export the instance token in it "
                                        "(--token-env names the variable, never the token)")
        return value
    value = getpass.getpass("instance token: ") if sys.stdin.isatty() else sys.stdin.readline()
    value = value.strip()
    if not value:
        raise ConfigError("--token-env", "no token given; pass --token-env VAR or type the token at the prompt "
                                         "(or pipe it on stdin)")
    return value


def _instances_add(args: argparse.Namespace) -> int:
    token = read_token(args.token_env)

    async def run(store: Store) -> int:
        ref = await store.register_instance(args.organization, args.name, token, owner=args.owner)
        print(f"instance {ref.name} (id {ref.id}) registered in organization {args.organization}; "
              "token stored as its SHA-256 only")
        return 0

    return _with_store(run)


def _instances_list(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        items = await store.list_instances()
        print(f"{'id':>4}  {'organization':<20} {'instance':<24} {'owner':<16} status")
        for i in items:
            print(f"{i['id']:>4}  {i['organization']:<20} {i['name']:<24} {i['owner'] or '-':<16} {i['status']}")
        if not items:
            print("(no instances: add one with `whatrack instances add`)")
        return 0

    return _with_store(run)


def _leads(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        items = await store.list_leads(args.organization_id, limit=args.limit)
        print(f"{'org':>4} {'organization':<20} {'instance':>8} {'instance name':<24} {'lead':>6}  {'phone':<16} name")
        for i in items:
            inst = "-" if i["instance_id"] is None else str(i["instance_id"])
            phone = i["phone"] or ("(group)" if i["is_group"] else "-")
            print(f"{i['organization_id']:>4} {i['organization']:<20} {inst:>8} {i['instance'] or '-':<24} "
                  f"{i['lead_id']:>6}  {phone:<16} {i['name'] or ''}".rstrip())
        if not items:
            print("(no leads yet: they appear when a webhook stores a message)")
        else:
            print("schedule one: whatrack followup schedule --organization-id ORG --instance-id INSTANCE "
                  "--lead-id LEAD --text '...' --in 10m")
        return 0

    return _with_store(run)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number, e.g. 50")
    return int(text)


def _db_upgrade(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        await store.upgrade()
        print(f"database {store.url} is at revision {await store.revision()}")
        return 0

    return _with_store(run)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inst = subparsers.add_parser("instances", help="register and list UAZAPI instances")
    isub = inst.add_subparsers(dest="instances_command", metavar="ACTION", required=True)
    # allow_abbrev=False: otherwise `--token SECRET` would be taken for `--token-env SECRET`.
    add = isub.add_parser("add", help="register (or update) an instance; only the token's hash is stored",
                          allow_abbrev=False)
    add.add_argument("--organization", required=True, help="organization name (created when new)")
    add.add_argument("--name", required=True, help="the UAZAPI instance name (instanceName in webhooks)")
    add.add_argument("--owner", help="the instance's phone number, digits only")
    add.add_argument("--token-env", metavar="VAR",
                     help="environment variable holding the instance token (default: prompt, or stdin)")
    add.set_defaults(func=_instances_add)
    lst = isub.add_parser("list", help="list instances (tokens are never shown)")
    lst.set_defaults(func=_instances_list)

    leads = subparsers.add_parser("leads", help="list leads with the ids `whatrack followup schedule` takes",
                                  description="Leads, newest first, one row per instance each talked through: the "
                                              "organization, instance and lead ids a follow-up needs (DATABASE_URL).")
    leads.add_argument("--organization-id", type=_positive, default=None, metavar="ID",
                       help="only this organization's leads")
    leads.add_argument("--limit", type=_positive, default=100, metavar="N", help="at most N rows (default 100)")
    leads.set_defaults(func=_leads)

    db = subparsers.add_parser("db", help="database schema")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="run the migrations to the latest revision (DATABASE_URL)")
    up.set_defaults(func=_db_upgrade)
