"""The Upstash REST stand-in, judged by the official ``upstash-redis`` client and by raw HTTP (A.10)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest
import redis
from devstack_support import rest_server, tls_redis
from upstash_redis import Redis
from upstash_redis.errors import UpstashError

TOKEN = "rest-token-0123456789abcdef"


@pytest.fixture(scope="module")
def upstash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, redis.Redis]]:
    """(REST URL, a direct redis-py client on the same TLS Redis)."""
    d = tmp_path_factory.mktemp("upstash")
    with tls_redis(d) as (r, ca), rest_server(r.url, ca, d, TOKEN) as url:
        direct = redis.Redis.from_url(r.url, ssl_ca_certs=str(ca))
        yield url, direct
        direct.close()


@pytest.fixture
def client(upstash: tuple[str, redis.Redis]) -> Iterator[Redis]:
    url, direct = upstash
    direct.flushall()
    c = Redis(url, TOKEN, allow_telemetry=False, rest_retries=0)
    yield c
    c.close()


def test_strings_and_keys(client: Redis) -> None:
    assert client.set("s", "v", ex=100) is True
    assert client.get("s") == "v"
    assert 0 < client.ttl("s") <= 100
    assert client.incrby("n", 5) == 5
    assert client.incrbyfloat("f", 1.5) == 1.5
    assert client.mset({"a": "1", "b": "2"}) is True
    assert client.mget("a", "b", "missing") == ["1", "2", None]
    assert client.append("a", "23") == 3
    assert client.getrange("a", 1, 2) == "23"
    assert client.set("s", "w", nx=True) is False
    assert client.exists("a", "b", "zz") == 2
    assert client.delete("a", "b") == 2


def test_hashes_lists_sets(client: Redis) -> None:
    assert client.hset("h", values={"x": "1", "y": "ü"}) == 2
    assert client.hgetall("h") == {"x": "1", "y": "ü"}
    assert client.hincrby("h", "x", 4) == 5
    assert client.hdel("h", "y") == 1
    assert client.rpush("l", "a", "b", "c") == 3
    assert client.lrange("l", 0, -1) == ["a", "b", "c"]
    assert client.lpop("l") == "a"
    assert client.llen("l") == 2
    assert client.sadd("set", "p", "q", "p") == 2
    assert sorted(client.smembers("set")) == ["p", "q"]
    assert client.sismember("set", "q") is True


def test_sorted_sets(client: Redis) -> None:
    assert client.zadd("z", {"a": 1.5, "b": 2, "c": -3}) == 3
    assert client.zrange("z", 0, -1, withscores=True) == [("c", -3.0), ("a", 1.5), ("b", 2.0)]
    assert client.zscore("z", "a") == 1.5
    assert client.zincrby("z", 1, "a") == 2.5
    assert client.zrangebyscore("z", 2, "+inf") == ["b", "a"] or client.zrangebyscore("z", 2, "+inf") == ["a", "b"]
    assert client.zcard("z") == 3


def test_streams(client: Redis) -> None:
    first = client.xadd("st", "*", {"f": "v1"})
    client.xadd("st", "*", {"f": "v2"})
    assert client.xlen("st") == 2
    entries = client.xrange("st", "-", "+")
    assert entries[0][0] == first and entries[0][1] == ["f", "v1"]
    assert client.xgroup_create("st", "g", "0") == "OK"
    got = client.xreadgroup("g", "c1", {"st": ">"}, count=1)
    assert got[0][0] == "st" and got[0][1][0][1] == ["f", "v1"]


def test_scripts(client: Redis) -> None:
    assert client.eval("return {1, 2, ARGV[1], redis.call('SET', KEYS[1], 'x')['ok']}", ["k"], ["a"]) == \
        [1, 2, "a", "OK"]
    sha = client.script_load("return redis.call('GET', KEYS[1])")
    assert client.evalsha(sha, ["k"]) == "x"
    with pytest.raises(UpstashError, match="NOSCRIPT"):
        client.evalsha("0" * 40, [])


def test_pipeline_and_transaction(client: Redis) -> None:
    p = client.pipeline()
    p.set("p", "1")
    p.incr("p")
    p.get("p")
    assert p.exec() == [True, 2, "2"]
    m = client.multi()
    m.set("m", "1")
    m.incrby("m", 9)
    assert m.exec() == [True, 10]


def test_binary_and_unicode_values(client: Redis, upstash: tuple[str, redis.Redis]) -> None:
    url, direct = upstash
    text = "olá 👋 日本 \u200d ✓"
    client.set("u", text)
    assert direct.get("u") == text.encode("utf-8")
    assert client.get("u") == text
    raw = bytes(range(256))  # not UTF-8: base64 carries it byte for byte
    direct.set("bin", raw)
    r = httpx.post(url, json=["GET", "bin"], headers={"Authorization": f"Bearer {TOKEN}",
                                                        "Upstash-Encoding": "base64"})
    assert base64.b64decode(r.json()["result"]) == raw
    with pytest.raises(UnicodeDecodeError):  # the SDK decodes strict UTF-8 (A.4): the stand-in must not hide it
        client.get("bin")


def test_errors_reach_the_client(client: Redis) -> None:
    client.set("str", "x")
    with pytest.raises(UpstashError, match=r"^WRONGTYPE"):
        client.lpush("str", "y")
    with pytest.raises(UpstashError, match="ERR wrong number of arguments"):
        client.execute(["SET", "only-key"])
    p = client.pipeline()
    p.set("ok", "1")
    p.lpush("str", "y")
    with pytest.raises(UpstashError, match="WRONGTYPE"):
        p.exec()
    assert client.get("ok") == "1"  # a pipeline is not atomic: the first command ran


def test_bad_token_is_the_clients_auth_error(upstash: tuple[str, redis.Redis]) -> None:
    bad = Redis(upstash[0], "not-the-token", allow_telemetry=False, rest_retries=0)
    with pytest.raises(UpstashError, match="WRONGPASS"):
        bad.get("x")
    bad.close()


def _post(url: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}", **headers})


def test_wire_protocol(upstash: tuple[str, redis.Redis]) -> None:
    url, direct = upstash
    direct.flushall()
    r = httpx.post(url, json=["PING"])
    assert (r.status_code, r.json()) == (401, {"error": "WRONGPASS invalid or missing auth token"})
    assert r.headers["content-type"] == "application/json" and r.headers["upstash-sync-token"]
    assert httpx.post(f"{url}?_token={TOKEN}", json=["PING"]).json() == {"result": "PONG"}
    r = httpx.delete(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 405 and "error" in r.json()
    r1, r2 = _post(url, ["SET", "k", 1.5]), _post(url, ["SET", "b", True], **{"Upstash-Encoding": "base64"})
    assert r1.json() == {"result": "OK"} and r2.json() == {"result": "OK"}  # "OK" is never base64-encoded
    assert r1.headers["upstash-sync-token"] != r2.headers["upstash-sync-token"]
    assert direct.mget("k", "b") == [b"1.5", b"true"]
    assert _post(url, ["GET", "k"], **{"Upstash-Encoding": "base64"}).json() == {"result": "MS41"}
    assert _post(url, ["INCR", "k"]).status_code == 400
    bad = _post(url, {"not": "a list"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("ERR")
    assert _post(url, ["SET", "k", {"nested": 1}]).status_code == 400
    notjson = httpx.post(url, content=b"{", headers={"Authorization": f"Bearer {TOKEN}"})
    assert notjson.status_code == 400 and "JSON" in notjson.json()["error"]
    blocked = _post(url, ["BLPOP", "l", 0])
    assert blocked.status_code == 400 and "not supported" in blocked.json()["error"]
    assert _post(url, ["XREAD", "BLOCK", 0, "STREAMS", "s", "$"]).status_code == 400
    # path style: GET with escaped args, POST with the body as the last argument and query pairs after it
    assert httpx.get(f"{url}/set/p%2Fq/a%20b?_token={TOKEN}").json() == {"result": "OK"}
    assert direct.get("p/q") == b"a b"
    assert httpx.post(f"{url}/set/body?EX=100&_token={TOKEN}", content=b"raw body").json() == {"result": "OK"}
    assert direct.get("body") == b"raw body" and direct.ttl("body") > 0
    assert httpx.get(f"{url}?_token={TOKEN}").status_code == 200


def test_pipeline_and_multi_exec_wire(upstash: tuple[str, redis.Redis]) -> None:
    url, direct = upstash
    direct.flushall()
    r = _post(f"{url}/pipeline", [["FLUSHDB"], ["SET", "a", "x"], ["INCR", "a"], ["GET", "a"]])
    assert r.status_code == 200
    assert r.json()[:2] == [{"result": "OK"}, {"result": "OK"}]
    assert r.json()[2]["error"].startswith("ERR value is not an integer")
    assert r.json()[3] == {"result": "x"}
    r = _post(f"{url}/multi-exec", [["SET", "t", "1"], ["INCR", "a"], ["INCR", "t"]])
    assert r.status_code == 200
    assert r.json()[0] == {"result": "OK"} and "error" in r.json()[1] and r.json()[2] == {"result": 2}
    r = _post(f"{url}/multi-exec", [["SET", "t", "9"], ["NOSUCHCOMMAND"]])  # a queueing error: discarded
    assert r.status_code == 400 and isinstance(r.json(), dict) and r.json()["error"].startswith("EXECABORT")
    assert direct.get("t") == b"2"
