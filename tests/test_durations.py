from __future__ import annotations

import pytest

from whatrack.durations import parse_seconds


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("1.5", 1.5), ("45s", 45.0), ("10m", 600.0), ("1h30m", 5400.0), ("2d", 172800.0),
    ("500ms", 0.5), ("1m500ms", 60.5), (" 1H ", 3600.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "1h 30", "-5s", "10m!"])
def test_bad_durations_name_good_ones(text: str) -> None:
    with pytest.raises(ValueError, match="10m, 1h30m"):
        parse_seconds(text)
