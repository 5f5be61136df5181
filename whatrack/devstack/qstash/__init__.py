"""The offline QStash broker: the v2 API as ``protocols/qstash.md`` describes it, durable in Redis."""
