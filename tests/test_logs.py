from __future__ import annotations

import logging

import pytest

from whatrack.logs import RedactingFilter
from whatrack.settings import MASK


def test_redacts_known_values_and_token_shapes(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("whatrack.test_logs")
    caplog.handler.addFilter(RedactingFilter(["s3cret-value"]))
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJVcHN0YXNoIn0.c2lnbmF0dXJlX2J5dGVz"
    with caplog.at_level(logging.INFO, logger="whatrack.test_logs"):
        log.info("token %s and %s and sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r", "s3cret-value", jwt)
    [record] = caplog.records
    text = record.getMessage()
    assert "s3cret-value" not in text and jwt not in text and "sig_7kYj" not in text
    assert text.count(MASK) == 3
