"""Who the caller is, in-process: the real gateway over a fake vLLM (tests/gateway/asgi.py). One
credential per request, as Authorization: Bearer; each tier's key gets its tier's λ; /metrics opens
to the metrics key alone; only the allow-listed routes answer; no websocket is accepted. Judged by
status, error body, headers, what the fake vLLM received, and the audit line."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from antidistill.server.tiers import hash_key

from tests.gateway.asgi import CHAT, COMPLETIONS, METRICS_BODY, METRICS_KEY, Gateway, chat, completion, open_gateway

TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "pro": {"lambda": 1.0, "min_lambda": 0.5, "max_lambda": 2.0, "profile": "code"},
    "internal": {"lambda": 0.0},
}
KEYS = {"free": {"tier": "free"}, "pro": {"tier": "pro"}, "internal": {"tier": "internal"}}
KEYS_WITH_REVOKED = {**KEYS, "revoked": {"tier": "free", "revoked": True}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with open_gateway(tmp_path_factory.mktemp("keys"), TIERS, KEYS_WITH_REVOKED) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def anon(tmp_path_factory) -> Iterator[Gateway]:
    tiers = {**TIERS, "anonymous": {"lambda": 5.0, "max_lambda": 5.0}}
    with open_gateway(tmp_path_factory.mktemp("anonymous"), tiers, KEYS) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(gw: Gateway) -> None:
    gw.fake.reset()


def refused(gw: Gateway, res, status: int, needle: str) -> dict:
    """The refusal's error object, after checking it is one that reached nothing downstream."""
    assert res.status_code == status, (res.status_code, res.text)
    err = res.json()["error"]
    assert needle in err["message"], err
    assert err["code"] == status and "choices" not in res.text
    assert gw.fake.received == [], "a refused request reached vLLM"
    return err


def test_no_key_is_401_with_a_bearer_challenge(gw):
    for path, body in ((COMPLETIONS, completion()), (CHAT, chat())):
        res = gw.post(None, body, path)
        err = refused(gw, res, 401, "missing API key")
        assert err["type"] == "authentication_error" and res.headers["www-authenticate"] == "Bearer"
        line = gw.last_audit()
        assert line["status"] == 401 and line["tier"] is None and line["key_id"] == "none" and line["lambda"] is None
    res = gw.request("GET", "/v1/models")
    refused(gw, res, 401, "missing API key")
    res = gw.request("GET", COMPLETIONS)  # a method vLLM would refuse: still behind the key
    refused(gw, res, 401, "missing API key")


def test_wrong_and_revoked_keys_are_401_and_audited_by_hash(gw):
    for key in ("ad-not-a-key", gw.keys["revoked"], gw.keys["free"] + "x", METRICS_KEY):
        res = gw.post(None, completion(), headers=[("authorization", f"Bearer {key}")])
        refused(gw, res, 401, "invalid or revoked API key")
        line = gw.last_audit()
        assert line["key_id"] == hash_key(key)[:12] and line["status"] == 401 and line["tier"] is None
        assert key not in str(line), "the audit line never holds the key itself"


def test_malformed_authorization_is_refused(gw):
    key = gw.keys["free"]
    cases = [
        (f"Basic {key}", 401, "unsupported authorization scheme 'Basic'"),
        (f"Token {key}", 401, "unsupported authorization scheme"),
        (key, 401, "unsupported authorization scheme"),  # the key without a scheme
        ("Bearer", 401, "missing API key"),
        (f"Bearer {key} {key}", 401, "invalid or revoked"),
    ]
    for value, status, needle in cases:
        res = gw.post(None, completion(), headers=[("authorization", value)])
        refused(gw, res, status, needle)
        assert res.headers["www-authenticate"] == "Bearer"
    ok = gw.post(None, completion(), headers=[("authorization", f"bearer {key}")])  # the scheme is case-blind
    assert ok.status_code == 200 and ok.headers["x-antidistillation-tier"] == "free"


def test_exactly_one_credential(gw):
    free, internal = gw.keys["free"], gw.keys["internal"]
    cases = [
        ([("authorization", f"Bearer {free}"), ("authorization", f"Bearer {free}")], None, "2 Authorization headers"),
        ([("authorization", "Bearer ad-bogus"), ("authorization", f"Bearer {internal}")], None, "2 Authorization"),
        ([("authorization", f"Bearer {free}"), ("x-api-key", internal)], None, "credential in x-api-key header"),
        ([("authorization", f"Bearer {free}"), ("api-key", free)], None, "credential in api-key header"),
        ([("authorization", f"Bearer {free}")], {"api_key": internal}, "credential in query parameter api_key"),
        ([("authorization", f"Bearer {free}")], {"key": free}, "query parameter key"),
        ([("x-api-key", internal)], None, "credential in x-api-key header"),
        ([], {"apikey": internal}, "query parameter apikey"),
    ]
    for headers, params, needle in cases:
        for method, path in (("POST", COMPLETIONS), ("GET", "/v1/models")):
            body = completion() if method == "POST" else None
            res = gw.request(method, path, headers=headers, params=params, body=body)
            err = refused(gw, res, 400, needle)
            assert err["type"] == "invalid_request_error" and "www-authenticate" not in res.headers
            assert gw.last_audit()["status"] == 400 and gw.last_audit()["tier"] is None


def test_each_tier_key_gets_its_lambda(gw):
    expected = {"free": (3.0, None), "pro": (1.0, "code"), "internal": (0.0, None)}
    for name, (lam, profile) in expected.items():
        gw.fake.reset()
        res = gw.post(name, completion())
        assert res.status_code == 200, res.text
        assert res.headers["x-antidistillation-tier"] == name
        assert res.headers["x-antidistillation-lambda"] == f"{lam:g}"
        (got,) = gw.fake.received
        assert got.xargs["ad_lambda"] == lam and got.xargs.get("ad_profile") == profile
        assert (got.ticket is not None) == (lam > 0), got.xargs  # only protected requests are watched
        assert got.header(b"authorization") == [f"Bearer {gw.keys[name]}".encode()]
        line = gw.last_audit()
        assert (line["tier"], line["lambda"], line["status"], line["profile"]) == (name, lam, 200, profile)
        assert line["key_id"] == hash_key(gw.keys[name])[:12] and line["completion_tokens"] == 4


def test_metrics_need_the_metrics_key_not_an_api_key(gw):
    before = len(gw.tap.lines)
    res = gw.request("GET", "/metrics", headers=[("authorization", f"Bearer {METRICS_KEY}")])
    assert res.status_code == 200 and res.content == METRICS_BODY
    assert [r.path for r in gw.fake.received] == ["/metrics"]
    gw.fake.reset()
    for name in ("free", "pro", "internal"):
        res = gw.request("GET", "/metrics", name)
        assert res.status_code == 401 and "API keys do not open /metrics" in res.json()["error"]["message"]
        assert res.headers["www-authenticate"] == "Bearer" and b"antidistill_" not in res.content
    res = gw.request("GET", "/metrics")
    assert res.status_code == 401 and "needs Authorization" in res.json()["error"]["message"]
    twice = [("authorization", f"Bearer {METRICS_KEY}")] * 2
    assert gw.request("GET", "/metrics", headers=twice).status_code == 400
    metrics_as_query = gw.request("GET", "/metrics", params={"api_key": METRICS_KEY})
    assert metrics_as_query.status_code == 400
    assert gw.fake.received == [], "no refused scrape reached vLLM's /metrics"
    assert len(gw.tap.lines) == before, "scrapes write no audit lines"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_routes_outside_the_allow_list_are_404(gw, method):
    paths = [
        "/tokenize",
        "/detokenize",
        "/v1/responses/resp_x/input_items",
        "/v1/messages/batches",
        "/v1/embeddings",
        "/v1/audio/transcriptions",
        "/invocations",
        "/pooling",
        "/score",
        "/v1/score",
        "/rerank",
        "/classify",
        "/openapi.json",
        "/docs",
        "/load",
        "/v1/load_lora_adapter",
        "/v1/completions/",  # not the route: Starlette would redirect it to the route
        "/V1/completions",
        "/v1//completions",
        "/v1/chat/completions/render",
        "/health/",
    ]
    for path in paths:
        for name in (None, "internal"):  # a key changes nothing: the allow-list comes first
            res = gw.request(method, path, name, body={} if method == "POST" else None)
            assert res.status_code == 404, (path, name, res.status_code)
            err = res.json()["error"]
            assert err["type"] == "not_found_error" and "is not exposed by this server" in err["message"]
    assert gw.fake.received == []


def test_allow_listed_routes_answer(gw):
    for path in ("/health", "/ping"):  # orchestrators probe these without a key
        assert gw.request("GET", path).status_code == 200
    assert gw.request("GET", "/version").status_code == 401
    for path in ("/v1/models", "/version"):
        res = gw.request("GET", path, "free")
        assert res.status_code == 200 and res.headers.get("x-antidistillation-lambda") is None, path
    res = gw.request("GET", COMPLETIONS, "free")  # passed on as it is: vLLM refuses the method
    assert res.status_code == 405
    assert [(r.method, r.path) for r in gw.fake.received] == [
        ("GET", "/health"),
        ("GET", "/ping"),
        ("GET", "/v1/models"),
        ("GET", "/version"),
        ("GET", COMPLETIONS),
    ]


def test_websockets_are_closed(gw):
    for name in (None, "internal"):
        out = gw.raw("/v1/realtime", [{"type": "websocket.connect"}], name=name, kind="websocket")
        assert out.messages == [{"type": "websocket.close", "code": 1008}]
        assert out.reads == 0, "the handshake is not even read"
    assert gw.fake.received == []


def test_a_bad_key_does_not_fall_back_to_the_anonymous_tier(anon):
    anon.fake.reset()
    res = anon.post(None, completion())
    assert res.status_code == 200 and res.headers["x-antidistillation-tier"] == "anonymous"
    assert res.headers["x-antidistillation-lambda"] == "5" and anon.fake.received[0].xargs["ad_lambda"] == 5.0
    assert anon.last_audit()["key_id"] == "anonymous"
    for value in ("Bearer ad-not-a-key", f"Basic {anon.keys['free']}"):
        res = anon.post(None, completion(), headers=[("authorization", value)])
        assert res.status_code == 401, value
    res = anon.post("internal", completion())
    assert res.status_code == 200 and res.headers["x-antidistillation-tier"] == "internal"
    assert len(anon.fake.received) == 2
