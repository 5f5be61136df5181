"""The proof that no message is lost: load generator, loss ledger, fault matrix, DLQ replay, cost projection.

Submodules: ``generate`` (seeded webhooks), ``load`` (publish through QStash, settle), ``ledger`` (classify every
message), ``plots``, ``faults`` (runs the matrix), ``scenarios`` (its rows as data, their injectors), ``front`` (an HTTP
front answering some 503s), ``worker_faults`` (the follow-up worker killed mid-job), ``replay`` (fixtures and the DLQ
through the endpoint), ``cost`` (Upstash commands and QStash deliveries projected per month).
"""
