"""PostgreSQL storage: SQLAlchemy models, the Alembic schema, and :class:`Store` (the webhook's and worker's writes)."""

from whatrack.store.api import InstanceRef, Store

__all__ = ["InstanceRef", "Store"]
