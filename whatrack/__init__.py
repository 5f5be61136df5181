"""whatrack: the move of a WhatsApp CRM's webhook path and follow-up queue onto Upstash, done and proven."""

from __future__ import annotations

__version__ = "0.1.0"
