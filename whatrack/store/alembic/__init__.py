"""Alembic migrations of whatrack's database (run them with ``Store.upgrade()`` or ``whatrack db upgrade``)."""
