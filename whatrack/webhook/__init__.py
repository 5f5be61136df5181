"""The webhook endpoint: QStash delivery in, verify -> normalize -> store -> 2xx out (Starlette on uvicorn)."""

from whatrack.webhook.app import MAX_BODY_BYTES, build_handler, create_app
from whatrack.webhook.handler import Outcome, WebhookHandler

__all__ = ["MAX_BODY_BYTES", "Outcome", "WebhookHandler", "build_handler", "create_app"]
