"""The proof that no message is lost: load generator, loss ledger, fault matrix, DLQ replay, cost projection.

Submodules: ``generate`` (seeded webhooks), ``load`` (publish through QStash, settle), ``ledger`` (classify every
message), ``plots``, ``faults`` (the matrix, scenarios as data), ``front`` (an HTTP front answering some 503s),
``worker_faults`` (the follow-up worker killed mid-job), ``replay`` (fixtures and the DLQ through the endpoint),
``cost`` (Upstash commands and QStash deliveries projected per month).
"""
