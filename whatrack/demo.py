"""The demo identity: the organization and the UAZAPI instance the offline stack, the replay and the load tooling
share. Pure constants, importable from any layer (the devstack, proof, tests) without importing the devstack."""

from __future__ import annotations

#: The organization the demo instances are registered under.
DEMO_ORGANIZATION = "whatrack demo"
#: The demo instance: its token is the one in the shared UAZAPI fixtures' ``token`` field, so replayed fixtures
#: resolve to it.
DEMO_NAME, DEMO_OWNER, DEMO_TOKEN = "demo", "5511999990000", "0f0e0d0c-aaaa-4bbb-8ccc-000000000001"

__all__ = ["DEMO_NAME", "DEMO_ORGANIZATION", "DEMO_OWNER", "DEMO_TOKEN"]
