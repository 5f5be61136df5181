"""The one exception tree of whatrack.

Every error whatrack raises on purpose derives from :class:`WhatrackError`. Vendor errors are wrapped with
``raise ... from e`` so that the cause stays visible while the message stays ours (and free of secrets).

    WhatrackError
    ├── ConfigError            a setting is missing or malformed (names the variable, shows a good example)
    ├── SignatureError         a QStash delivery failed verification (says which check: expired, url, body, key)
    ├── PayloadError           a webhook body that can never succeed (not JSON, no message id, unknown instance)
    ├── StoreError             the database failed (transient: the delivery should be retried)
    ├── PublishError           realtime publication failed (transient)
    ├── SendError              UAZAPI refused or failed a send (``retryable`` says whether to try again)
    ├── QueueError             a BullMQ / follow-up operation failed
    ├── MigrationError         probing, copying, verifying or rolling back Redis failed
    ├── StackError             the offline devstack could not start, stop or answer
    └── RunError               a notebook run failed (names the phase and the cell)

Each error's ``str()`` is safe to log and to show: it never contains a token, a key, a signature or a password.
"""

from __future__ import annotations


class WhatrackError(Exception):
    """Root of every error whatrack raises on purpose."""


class ConfigError(WhatrackError):
    """A setting is missing or malformed.

    Attributes:
        variable: the environment variable at fault.
        example: a well-formed example value (never a real secret).
    """

    def __init__(self, variable: str, problem: str, example: str | None = None) -> None:
        self.variable = variable
        self.problem = problem
        self.example = example
        hint = f" (example: {variable}={example})" if example else ""
        super().__init__(f"{variable}: {problem}{hint}")


class SignatureError(WhatrackError):
    """A QStash delivery failed signature verification.

    Attributes:
        reason: one of ``missing``, ``malformed``, ``bad_key``, ``expired``, ``not_yet_valid``, ``wrong_url``,
            ``body_changed``, ``bad_claims``: which check failed.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"signature rejected ({reason}): {detail}")


class PayloadError(WhatrackError):
    """A webhook body that can never be processed, however often it is retried.

    Attributes:
        reason: a short machine-readable code (``not_json``, ``no_message_id``, ``unknown_instance``, ...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class StoreError(WhatrackError):
    """The database failed in a way a retry may fix (unreachable, timed out, serialization failure)."""


class StoreAuthError(StoreError):
    """The database refused whatrack's credentials (wrong password or user, no access to the database): a
    configuration error, which no retry fixes, not an outage. The message names ``DATABASE_URL``."""


class PublishError(WhatrackError):
    """Realtime publication (Centrifugo) failed in a way a retry may fix."""


class SendError(WhatrackError):
    """UAZAPI failed to send a message.

    Attributes:
        status: the HTTP status, when there was a response.
        retryable: whether sending again may succeed (5xx, timeouts) or not (4xx: bad number, bad token).
    """

    def __init__(self, detail: str, *, status: int | None = None, retryable: bool = True) -> None:
        self.status = status
        self.retryable = retryable
        super().__init__(detail)


class QueueError(WhatrackError):
    """A BullMQ follow-up operation failed."""


class MigrationError(WhatrackError):
    """A Redis migration step (probe, inventory, copy, verify, rollback) failed."""


class StackError(WhatrackError):
    """The offline devstack could not start, stop or reach one of its parts."""


class RunError(WhatrackError):
    """A notebook run failed.

    Attributes:
        phase: the notebook (phase) that failed.
        cell: the index of the failing cell, when known.
    """

    def __init__(self, phase: str, detail: str, cell: int | None = None) -> None:
        self.phase = phase
        self.cell = cell
        self.detail = detail
        where = f" (cell {cell})" if cell is not None else ""
        super().__init__(f"phase {phase} failed{where}: {detail}")
