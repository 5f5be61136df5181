from __future__ import annotations

from pathlib import Path

import pytest

from whatrack.errors import ConfigError
from whatrack.settings import MASK, Secret, Settings, mask_url

TOKEN = "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0="
KEY = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r"


def test_reads_every_prd_name_and_masks_secrets() -> None:
    env = {
        "UPSTASH_REDIS_URL": "rediss://default:pw-123@eu1-x.upstash.io:6379",
        "UPSTASH_REDIS_REST_URL": "https://eu1-x.upstash.io",
        "UPSTASH_REDIS_REST_TOKEN": "rest-token-abc",
        "QSTASH_TOKEN": TOKEN,
        "QSTASH_CURRENT_SIGNING_KEY": KEY,
        "QSTASH_NEXT_SIGNING_KEY": "sig_next",
        "DATABASE_URL": "postgresql://u:dbpw@127.0.0.1/whatrack",
        "CENTRIFUGO_API_KEY": "cent-key",
    }
    s = Settings.from_env(env)
    assert s.qstash_token == Secret(TOKEN)
    assert s.signing_keys() == (KEY, "sig_next")
    assert s.database_url == "postgresql+psycopg://u:dbpw@127.0.0.1/whatrack"
    assert s.mode == "cloud"
    text = repr(s) + str(s.masked()) + str(list(s))
    for secret in ("pw-123", "rest-token-abc", TOKEN, KEY, "sig_next", "dbpw", "cent-key"):
        assert secret not in text
        assert secret in s.secret_values()
    assert MASK in text


def test_missing_value_names_variable_with_example() -> None:
    s = Settings.from_env({})
    with pytest.raises(ConfigError) as e:
        s.signing_keys()
    assert e.value.variable == "QSTASH_CURRENT_SIGNING_KEY"
    assert "example" in str(e.value)


def test_upstash_host_on_plain_redis_is_refused_with_hint() -> None:
    with pytest.raises(ConfigError, match="rediss://") as e:
        Settings.from_env({"UPSTASH_REDIS_URL": "redis://default:secretpw@eu1-x.upstash.io:6379"})
    assert e.value.variable == "UPSTASH_REDIS_URL"
    assert "secretpw" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPSTASH_REDIS_URL", "http://x"),
        ("UPSTASH_REDIS_URL", "rediss://x.upstash.io:6379/3"),
        ("QSTASH_URL", "ftp://qstash"),
        ("QSTASH_URL", "http://qstash.example.com"),
        ("DATABASE_URL", "mysql://x/y"),
        ("QSTASH_TOKEN", "abc def"),
        ("WHATRACK_MODE", "prod"),
        ("WHATRACK_REDIS_CA_BUNDLE", "/nonexistent/ca.pem"),
    ],
)
def test_malformed_values_raise_config_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({name: value})
    assert e.value.variable == name


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    f = tmp_path / ".env"
    f.write_text("QSTASH_URL=http://127.0.0.1:8080\nQSTASH_TOKEN=from-file\n")
    s = Settings.from_env({"QSTASH_TOKEN": "from-env"}, env_files=(f,))
    assert s.qstash_url == "http://127.0.0.1:8080"
    assert s.qstash_token == Secret("from-env")
    assert s.mode == "offline"


def test_mask_url() -> None:
    assert mask_url("rediss://default:pw@h:6379/0") == f"rediss://default:{MASK}@h:6379/0"
    assert mask_url("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"


def test_instance_tokens_are_per_instance_and_masked() -> None:
    s = Settings.from_env({"UAZAPI_INSTANCE_TOKENS": "sales:tok-aaa, support:tok-bbb"})
    assert s.instance_token("support") == "tok-bbb"
    assert {"tok-aaa", "tok-bbb"} <= set(s.secret_values())
    assert "tok-aaa" not in repr(s) and s.masked()["UAZAPI_INSTANCE_TOKENS"] == f"sales:{MASK},support:{MASK}"
    with pytest.raises(ConfigError) as e:
        s.instance_token("other")
    assert e.value.variable == "UAZAPI_INSTANCE_TOKENS" and "tok-" not in str(e.value)
    with pytest.raises(ConfigError):
        Settings.from_env({"UAZAPI_INSTANCE_TOKENS": "no-colon-here"})


def test_redis_server_setting_is_an_executable(tmp_path: Path) -> None:
    s = Settings.from_env({"WHATRACK_REDIS_SERVER": "sh"}, env_files=())
    assert s.redis_server is not None and Path(s.redis_server).is_absolute() and Path(s.redis_server).name == "sh"
    assert s.masked()["WHATRACK_REDIS_SERVER"] == s.redis_server  # not a secret: shown as is
    assert Settings.from_env({}, env_files=()).redis_server is None
    not_exec = tmp_path / "redis-server"
    not_exec.write_text("#!/bin/sh\n")
    for bad in (str(not_exec), str(tmp_path), "no-such-redis-server-here"):
        with pytest.raises(ConfigError) as e:
            Settings.from_env({"WHATRACK_REDIS_SERVER": bad}, env_files=())
        assert e.value.variable == "WHATRACK_REDIS_SERVER" and e.value.example == "/usr/bin/redis-server"
