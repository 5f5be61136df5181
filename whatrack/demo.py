"""The demo identity: the organization, the UAZAPI instances and the QStash dev token that the offline stack, the
replay, the load tooling and the tests share. Pure constants, importable from any layer (the devstack, proof, tests)
without importing the devstack.

One source of truth: the stand-in UAZAPI serves :data:`DEMO_INSTANCES`, the stack's ``UAZAPI_INSTANCE_TOKENS`` maps
every one of them (:func:`instance_tokens`), and the shared UAZAPI fixtures name the first one (``instanceName``
``whatrack-demo-01``, its token and owner), so an instance registered from a replayed fixture can send follow-ups.
"""

from __future__ import annotations

#: The organization the demo instances are registered under.
DEMO_ORGANIZATION = "whatrack demo"
#: The demo instance: name, owner and token are the shared UAZAPI fixtures' ``instanceName``, ``owner`` and
#: ``token``, so replayed fixtures resolve to it and the worker finds its token.
DEMO_NAME, DEMO_OWNER, DEMO_TOKEN = "whatrack-demo-01", "5511999990000", "0f0e0d0c-aaaa-4bbb-8ccc-000000000001"
#: Every instance the offline stack registers with its stand-in UAZAPI: (name, token, owner).
DEMO_INSTANCES: tuple[tuple[str, str, str], ...] = ((DEMO_NAME, DEMO_TOKEN, DEMO_OWNER),)

#: The official QStash dev server's user 1 (protocols/qstash.md §3.9, docs qstash/howto/local-development.mdx): a
#: public test value that lets the JS SDK's dev mode recognise the broker. The one copy: the rest import it.
QSTASH_DEV_TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="  # noqa: S105


def instance_tokens(instances: tuple[tuple[str, str, str], ...] = DEMO_INSTANCES) -> str:
    """``UAZAPI_INSTANCE_TOKENS`` for ``instances``: ``name:token,...`` (a secret: never log it)."""
    return ",".join(f"{name}:{token}" for name, token, _ in instances)


def uazapi_instances(instances: tuple[tuple[str, str, str], ...] = DEMO_INSTANCES) -> str:
    """``WHATRACK_UAZAPI_INSTANCES`` for the stand-in UAZAPI: ``name:token:owner,...``."""
    return ",".join(f"{name}:{token}:{owner}" for name, token, owner in instances)


__all__ = ["DEMO_INSTANCES", "DEMO_NAME", "DEMO_ORGANIZATION", "DEMO_OWNER", "DEMO_TOKEN", "QSTASH_DEV_TOKEN",
           "instance_tokens", "uazapi_instances"]
