"""Cost and quota projection: Redis commands/s under load and at idle (``INFO commandstats`` deltas) and QStash
messages (retries included), projected to a day and a month and set against Upstash's plan figures.

The figures and where they come from (the team's protocol notes, which cite Upstash's pages):

- Upstash Redis pay-as-you-go: **$0.20 per 100K commands**; free tier **500K commands/month**
  (``protocols/bullmq.md`` §5 "Command billing"; §0 "Upstash cost"). Whether commands run inside Lua count is not
  settled there, so the projection counts client-level calls (``INFO commandstats`` counts both: see ``lua_calls``).
- QStash retries per message: at most **3 free / 5 pay-as-you-go / 20 pro** (``protocols/qstash.md`` §3.2, "the old
  pricing table"); DLQ retention **3 days free / 7 days pay-as-you-go** (§3.4); max HTTP response duration **15 min
  free / 2 h pay-as-you-go** (§3.3). ``protocols/qstash.md`` gives **no** daily message quota or price per message:
  pass ``qstash_daily_limit`` / ``qstash_price_per_100k`` from the console, else the table says "not in protocols".

Every function here is pure except :func:`command_total`, which reads one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: $ per 100K Redis commands, Upstash pay-as-you-go (protocols/bullmq.md §5).
REDIS_PAYG_USD_PER_100K = 0.20
#: Commands per month included in Upstash Redis's free tier (protocols/bullmq.md §5).
REDIS_FREE_COMMANDS_PER_MONTH = 500_000
#: QStash retry caps per plan (protocols/qstash.md §3.2, old pricing table).
QSTASH_MAX_RETRIES = {"free": 3, "payg": 5, "pro": 20}
#: DLQ retention in days (protocols/qstash.md §3.4).
QSTASH_DLQ_RETENTION_DAYS = {"free": 3, "payg": 7}
DAY_S = 86_400
MONTH_DAYS = 30


@dataclass(frozen=True)
class CommandStats:
    """A snapshot of ``INFO commandstats``: total calls, and calls of the scripting commands (EVAL/EVALSHA/FCALL)."""

    calls: int
    lua_calls: int
    by_command: dict[str, int]


def parse_commandstats(info: dict[str, Any]) -> CommandStats:
    """``INFO commandstats`` as redis-py parses it (``{"cmdstat_get": {"calls": 3, ...}}``) → totals. Pure.

    ``info`` itself is excluded: it is the measurement, not the load.
    """
    by: dict[str, int] = {}
    for key, value in info.items():
        if not key.startswith("cmdstat_") or not isinstance(value, dict):
            continue
        name = key.removeprefix("cmdstat_")
        if name == "info":
            continue
        by[name] = int(value.get("calls", 0))
    lua = sum(v for k, v in by.items() if k.split("|", 1)[0] in ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall"))
    return CommandStats(calls=sum(by.values()), lua_calls=lua, by_command=by)


def delta(before: CommandStats, after: CommandStats) -> CommandStats:
    """What happened between two snapshots (a restarted server counts from zero). Pure."""
    names = set(before.by_command) | set(after.by_command)
    by = {n: max(0, after.by_command.get(n, 0) - before.by_command.get(n, 0)) for n in names}
    return CommandStats(calls=max(0, after.calls - before.calls), lua_calls=max(0, after.lua_calls - before.lua_calls),
                        by_command={k: v for k, v in by.items() if v})


async def command_total(url: str, *, ca_bundle: str | None = None) -> CommandStats:
    """One ``INFO commandstats`` snapshot of the Redis at ``url`` (TLS verified for ``rediss://``).

    Raises:
        redis.RedisError: the server could not be reached.
    """
    from whatrack.redis_tcp import connect

    client = connect(url, ca_bundle=ca_bundle)
    try:
        return parse_commandstats(await client.info("commandstats"))
    finally:
        await client.aclose()


@dataclass(frozen=True)
class Projection:
    """Measured rates and their projection to a day and a 30-day month."""

    webhooks_per_day: float
    followups_per_day: float
    redis_cmds_per_s_load: float  # measured while follow-ups ran
    redis_cmds_per_s_idle: float  # measured at idle (the worker polling)
    redis_cmds_per_followup: float
    qstash_msgs_per_webhook: float  # deliveries (first attempts + retries) per webhook
    redis_cmds_per_day: float
    redis_cmds_per_month: float
    redis_usd_per_month: float
    qstash_msgs_per_day: float

    @property
    def redis_cmds_per_s_avg(self) -> float:
        return self.redis_cmds_per_day / DAY_S

    def table(self, *, qstash_daily_limit: int | None = None,
              qstash_price_per_100k: float | None = None) -> list[dict[str, str]]:
        """Rows ``{"item", "projection", "plan figure", "source"}`` for a notebook or the report."""
        def n(x: float) -> str:
            return f"{x:,.0f}"

        free_ok = "within" if self.redis_cmds_per_month <= REDIS_FREE_COMMANDS_PER_MONTH else "over"
        volume = f"{n(self.webhooks_per_day)} webhooks + {n(self.followups_per_day)} follow-ups a day"
        rows = [
            {"item": "Redis commands/s while follow-ups run", "projection": f"{self.redis_cmds_per_s_load:.1f}",
             "plan figure": "", "source": "measured (INFO commandstats delta, Upstash Redis)"},
            {"item": "Redis commands/s idle (worker polling)", "projection": f"{self.redis_cmds_per_s_idle:.2f}",
             "plan figure": "", "source": "measured (INFO commandstats delta, Upstash Redis)"},
            {"item": "Redis commands per follow-up", "projection": f"{self.redis_cmds_per_followup:.1f}",
             "plan figure": "", "source": "measured"},
            {"item": f"Redis commands/s, day average ({volume})", "projection": f"{self.redis_cmds_per_s_avg:.2f}",
             "plan figure": "", "source": "projection"},
            {"item": "Redis commands/month", "projection": n(self.redis_cmds_per_month),
             "plan figure": f"free tier {n(REDIS_FREE_COMMANDS_PER_MONTH)}/month: {free_ok}",
             "source": "protocols/bullmq.md §5"},
            {"item": "Redis cost/month (pay-as-you-go)", "projection": f"${self.redis_usd_per_month:,.2f}",
             "plan figure": f"${REDIS_PAYG_USD_PER_100K:.2f} per 100K commands", "source": "protocols/bullmq.md §5"},
            {"item": "QStash messages/day (retries included)", "projection": n(self.qstash_msgs_per_day),
             "plan figure": (f"daily limit {n(qstash_daily_limit)}: "
                             f"{'within' if self.qstash_msgs_per_day <= qstash_daily_limit else 'over'}"
                             if qstash_daily_limit else "daily quota not in protocols/qstash.md (read the console)"),
             "source": "measured publishes + RETRY events"},
            {"item": "QStash deliveries per webhook", "projection": f"{self.qstash_msgs_per_webhook:.3f}",
             "plan figure": "retries ≤ 3 free / 5 PAYG / 20 pro", "source": "protocols/qstash.md §3.2"},
            {"item": "DLQ retention", "projection": "replay within the window",
             "plan figure": "3 days free / 7 days PAYG", "source": "protocols/qstash.md §3.4"},
        ]
        if qstash_price_per_100k is not None:
            rows.append({"item": "QStash cost/month", "projection":
                         f"${self.qstash_msgs_per_day * MONTH_DAYS / 100_000 * qstash_price_per_100k:,.2f}",
                         "plan figure": f"${qstash_price_per_100k} per 100K (given)", "source": "parameter"})
        return rows


def project(*, webhooks_per_day: float, followups_per_day: float, followup_cmds: int, followups: int,
            followup_s: float, idle_cmds: int, idle_s: float, qstash_deliveries: int, webhooks: int) -> Projection:
    """Project a day from one measured follow-up run, one idle window and one webhook load. Pure.

    Redis per day = idle rate × the whole day + commands per follow-up × the day's follow-ups: the worker's polling
    runs all day, each job adds its own commands (conservative: the polling that ran during the follow-up run is
    charged to its jobs too). Webhooks do not touch the Upstash Redis (QStash is a separate service); they cost
    QStash deliveries: first attempts plus retries.

    Raises:
        ValueError: a measurement is empty.
    """
    if followups <= 0 or idle_s <= 0 or followup_s <= 0 or webhooks <= 0:
        raise ValueError("need followups > 0, followup_s > 0, idle_s > 0 and webhooks > 0 to project")
    idle_rate = idle_cmds / idle_s
    per_followup = followup_cmds / followups
    per_day = idle_rate * DAY_S + per_followup * followups_per_day
    per_webhook = qstash_deliveries / webhooks
    return Projection(
        webhooks_per_day=webhooks_per_day, followups_per_day=followups_per_day,
        redis_cmds_per_s_load=followup_cmds / followup_s, redis_cmds_per_s_idle=idle_rate,
        redis_cmds_per_followup=per_followup, qstash_msgs_per_webhook=per_webhook, redis_cmds_per_day=per_day,
        redis_cmds_per_month=per_day * MONTH_DAYS,
        redis_usd_per_month=per_day * MONTH_DAYS / 100_000 * REDIS_PAYG_USD_PER_100K,
        qstash_msgs_per_day=per_webhook * webhooks_per_day)
