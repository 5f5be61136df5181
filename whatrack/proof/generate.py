"""The load generator's pure part: N realistic UAZAPI webhooks, seeded, each with a unique WhatsApp message id.

Every body is one of the bundled UAZAPI message fixtures (text, image, audio, document, location, sticker, a group
message, an outbound ``fromMe`` echo) re-addressed to one of several instances and leads: the instance's owner phone,
its token, the lead's phone and LID, a fresh message id, an increasing timestamp. The same ``(n, seed, shape)`` always
gives byte-identical bodies, so a run can be repeated and a ledger re-checked against what was sent.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whatrack.errors import PayloadError

#: The fixtures that are messages (the generator's templates) and the share of traffic each gets. Text dominates
#: real WhatsApp CRM traffic; media and outbound echoes are the other common cases.
TEMPLATE_WEIGHTS: dict[str, int] = {
    "messages_inbound_text.json": 40,
    "messages_outbound_text_fromme.json": 20,
    "messages_inbound_image_caption.json": 10,
    "messages_inbound_audio_ptt.json": 8,
    "messages_group_inbound_text.json": 8,
    "messages_inbound_document.json": 5,
    "messages_inbound_location.json": 5,
    "messages_inbound_sticker.json": 4,
}

# The identities the fixtures are written with, replaced per generated body.
_FIX_OWNER = "5511999990000"
_FIX_OWNER_LID = "200000000000001"
_FIX_LEAD = "5511988887777"
_FIX_LEAD_LID = "100000000000001"
_FIX_GROUP = "120363000000000001"
_FIX_MEMBER = "5531966665555"
_FIX_MEMBER_LID = "100000000000003"
_FIX_INSTANCE = "whatrack-demo-01"
_FIX_TOKEN = "0f0e0d0c-aaaa-4bbb-8ccc-000000000001"  # noqa: S105 (the fixtures' fake instance token)
_FIX_PHONE_DISPLAY = "+55 11 98888-7777"

#: Generated instances are named with this prefix, so a ledger can tell load-test rows from anything else.
INSTANCE_PREFIX = "whatrack-load-"


@dataclass(frozen=True)
class LoadInstance:
    """One generated WhatsApp instance (what ``Store.register_instance`` needs)."""

    name: str
    token: str
    owner: str

    def __repr__(self) -> str:  # the token is a credential of the (fake) instance: keep it out of reprs
        return f"LoadInstance(name={self.name!r}, owner={self.owner!r})"


@dataclass(frozen=True)
class Webhook:
    """One generated webhook body and what it must become: exactly one message row with ``provider_id``."""

    seq: int
    provider_id: str  # "<owner>:<messageid>", UAZAPI's message.id
    external_id: str
    instance: str
    template: str
    direction: str  # inbound | outbound
    body: bytes


def load_templates(root: Path | None = None) -> dict[str, str]:
    """The template fixtures' text, by file name (default: the fixtures bundled in the package).

    Raises:
        PayloadError: a template is missing (a broken install).
    """
    if root is None:
        from whatrack.proof.replay import bundled_fixtures

        paths = {p.name: p for p in bundled_fixtures()}
    else:
        paths = {p.name: p for p in root.glob("*.json")}
    out: dict[str, str] = {}
    for name in TEMPLATE_WEIGHTS:
        if name not in paths:
            raise PayloadError("missing_template", f"fixture {name} not found; reinstall whatrack (pip install -e .)")
        out[name] = paths[name].read_text(encoding="utf-8")
    return out


def make_instances(count: int, seed: int) -> list[LoadInstance]:
    """``count`` instances with deterministic owners and tokens (the tokens are random-looking, not secret)."""
    rng = random.Random(f"instances:{seed}")
    return [LoadInstance(name=f"{INSTANCE_PREFIX}{seed}-{k:02d}",
                         token=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                         owner=f"55119{seed % 100:02d}{k:06d}") for k in range(count)]


def generate(n: int, *, seed: int = 0, instances: int = 3, leads: int = 50,
             templates: Mapping[str, str] | None = None,
             start: datetime = datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
             only: Sequence[LoadInstance] | None = None) -> list[Webhook]:
    """``n`` webhook bodies across ``instances`` instances and ``leads`` leads per instance. Pure given templates.

    Args:
        n: how many bodies.
        seed: the same seed gives the same bodies, byte for byte.
        instances: distinct WhatsApp instances (owners, tokens).
        leads: distinct leads (conversations) per instance.
        templates: fixture text by name (default: :func:`load_templates`).
        start: the first message's WhatsApp timestamp; each next one is one second later.
        only: use these instances (e.g. one the UAZAPI stand-in knows) instead of generated ones.

    Raises:
        ValueError: a non-positive size.
    """
    if n < 0 or instances < 1 or leads < 1:
        raise ValueError(f"need n >= 0, instances >= 1, leads >= 1 (got n={n}, instances={instances}, "
                         f"leads={leads})")
    tpl = dict(templates) if templates is not None else load_templates()
    names = sorted(TEMPLATE_WEIGHTS)
    weights = [TEMPLATE_WEIGHTS[t] for t in names]
    insts = list(only) if only else make_instances(instances, seed)
    instances = len(insts)
    rng = random.Random(f"bodies:{seed}")
    t0 = int(start.timestamp() * 1000)
    out: list[Webhook] = []
    for i in range(n):
        name = rng.choices(names, weights)[0]
        inst = insts[rng.randrange(instances)]
        lead = rng.randrange(leads)
        # 32 hex digits like WhatsApp's ids, unique per (seed, i) whatever the other parameters.
        mid = uuid.UUID(int=random.Random(f"id:{seed}:{i}").getrandbits(128)).hex.upper()
        out.append(_render(i, tpl[name], name, inst, lead, mid, t0 + i * 1000))
    return out


def _lead_phone(inst: LoadInstance, lead: int) -> str:
    return f"55{21 + int(inst.owner[-2:]) % 70:02d}9{lead:08d}"


def _render(seq: int, text: str, template: str, inst: LoadInstance, lead: int, mid: str, ts_ms: int) -> Webhook:
    lead_phone = _lead_phone(inst, lead)
    lead_lid = f"3{int(inst.owner[-4:]):05d}{lead:09d}"
    owner_lid = f"4{int(inst.owner[-6:]):014d}"
    group = f"1203630{int(inst.owner[-4:]):05d}{lead % 7:06d}"
    text = (text.replace(_FIX_INSTANCE, inst.name).replace(_FIX_TOKEN, inst.token)
            .replace(_FIX_PHONE_DISPLAY, "+" + lead_phone)
            .replace(_FIX_OWNER_LID, owner_lid).replace(_FIX_LEAD_LID, lead_lid)
            .replace(_FIX_MEMBER_LID, lead_lid).replace(_FIX_GROUP, group)
            .replace(_FIX_OWNER, inst.owner).replace(_FIX_LEAD, lead_phone).replace(_FIX_MEMBER, lead_phone))
    body: dict[str, Any] = json.loads(text)
    msg = body["message"]
    msg["messageid"] = mid
    msg["id"] = f"{inst.owner}:{mid}"
    msg["messageTimestamp"] = ts_ms
    direction = "outbound" if msg.get("fromMe") else "inbound"
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Webhook(seq=seq, provider_id=msg["id"], external_id=mid, instance=inst.name, template=template,
                   direction=direction, body=raw)


def instances_of(webhooks: Sequence[Webhook], seed: int, count: int) -> list[LoadInstance]:
    """The instances a generated batch uses (to register them before publishing)."""
    used = {w.instance for w in webhooks}
    return [i for i in make_instances(count, seed) if i.name in used]
