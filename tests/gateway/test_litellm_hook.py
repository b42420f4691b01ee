"""deploy/litellm/antidistill_signing.py (the LiteLLM callback) signs what the server's verifier accepts,
and names tiers only from what the operator controls.

The callback runs inside LiteLLM, which this project does not install: when LiteLLM is absent its
imports (the ``CustomLogger`` base class, which has no behaviour the callback uses, and the module
attribute ``aclient_session``) are provided as stand-ins, so the callback's own code — tier, account,
grant and signature — is what is tested. Step 2 runs on a real httpx client under the real OpenAI SDK
(the one LiteLLM's OpenAI-compatible provider calls), whose requests end at an in-process transport
that checks them with the server's verifier (headers, exact body bytes, nonce). The run against
LiteLLM's real proxy is described in docs/trusted-gateway.md ("What was validated")."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import yaml
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.trusted_gateway import SIGNED_HEADERS, GatewayVerifier
from antidistill.server.tiers import TiersFile, TierTable

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "litellm" / "antidistill_signing.py"
SECRET = "litellm-hook-test-" + "a1" * 20
API_BASE = "http://antidistill:8000/v1"
TIERS = TierTable(
    TiersFile.model_validate({"tiers": {"free": {"lambda": 3.0}, "pro": {"lambda": 1.0}, "internal": {"lambda": 0.0}}}),
    "test",
)
CHAT = {
    "id": "c",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
}
TEXT = {"id": "t", "object": "text_completion", "created": 0, "model": "m", "choices": [{"index": 0, "text": "ok"}]}


@pytest.fixture(scope="module")
def hook():
    mp = pytest.MonkeyPatch()  # the stand-in modules and the environment exist only while the file loads
    if importlib.util.find_spec("litellm") is None:
        base = types.ModuleType("litellm.integrations.custom_logger")
        base.CustomLogger = type("CustomLogger", (), {})
        for name in ("litellm", "litellm.integrations"):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["litellm"].aclient_session = None
        mp.setitem(sys.modules, "litellm.integrations.custom_logger", base)
    mp.setenv("ANTIDISTILL_GATEWAY_SECRET", SECRET)
    mp.setenv("ANTIDISTILL_API_BASE", API_BASE)
    mp.delenv("ANTIDISTILL_TIER_MAP", raising=False)
    mp.delenv("ANTIDISTILL_DEFAULT_TIER", raising=False)
    try:
        spec = importlib.util.spec_from_file_location("antidistill_signing", HOOK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    return module


def signer(hook, **kw):
    return hook.AntidistillSigner(**{"secret": SECRET, "api_base": API_BASE, "default_tier": "", **kw})


def step1(signer, user, data: dict | None = None, call_type: str = "acompletion") -> dict:
    return asyncio.run(signer.async_pre_call_hook(user, None, data or {}, call_type))


class Antidistill:
    """The server's side of the wire: each request the transport receives is checked as the
    middleware checks it (identify, then bind over the exact body bytes)."""

    def __init__(self) -> None:
        self.verifier = GatewayVerifier(SECRET)
        self.seen: list[httpx.Request] = []
        self.callers: list = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        scope = {"path": request.url.path, "method": request.method, "headers": request.headers.raw}
        try:
            caller = self.verifier.identify(scope, TIERS)
            await self.verifier.bind(scope, await request.aread())
        except Refusal as err:
            return httpx.Response(err.status, json={"error": {"message": err.message}})
        self.callers.append(caller)
        return httpx.Response(200, json=CHAT if request.url.path.endswith("/chat/completions") else TEXT)


def client_for(signer, server: Antidistill) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    client.event_hooks = {"request": [signer.sign_request]}
    return client


def send(signer, data: dict, url: str = API_BASE + "/chat/completions", body: bytes = b"{}") -> tuple:
    server = Antidistill()

    async def go() -> httpx.Response:
        async with client_for(signer, server) as client:
            return await client.post(url, content=body, headers=data.get("extra_headers") or {})

    response = asyncio.run(go())
    return response, server


def test_chat_and_text_completions_sent_by_the_openai_sdk_verify_with_their_exact_bytes(hook, monkeypatch):
    s = signer(hook)
    user = SimpleNamespace(team_id="acme", team_metadata={"antidistill_tier": "pro"})
    server = Antidistill()

    async def go() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(server))
        monkeypatch.setattr(hook.litellm, "aclient_session", http, raising=False)
        assert s.install() is http, "an operator's own client keeps its settings and gains the hook"
        sdk = openai.AsyncOpenAI(base_url=API_BASE, api_key="not-used", http_client=http, max_retries=0)
        data = await s.async_pre_call_hook(user, None, {"model": "smollm2"}, "acompletion")
        await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "héllo, naïve ünïcode ✓"}],
            extra_headers=data["extra_headers"],
            extra_body={"vllm_xargs": {"ad_lambda": 1.5}},
        )
        data = await s.async_pre_call_hook(user, None, {"model": "smollm2"}, "atext_completion")
        await sdk.completions.create(model="m", prompt="2 + 2 =", max_tokens=4, extra_headers=data["extra_headers"])
        await http.aclose()

    asyncio.run(go())
    assert [(c.tier_name, c.account) for c in server.callers] == [("pro", "team:acme")] * 2, [
        r.content for r in server.seen
    ]
    assert [r.url.path for r in server.seen] == ["/v1/chat/completions", "/v1/completions"]
    chat = server.seen[0]
    assert json.loads(chat.content)["vllm_xargs"] == {"ad_lambda": 1.5}, "extra_body is in the signed bytes"
    assert chat.headers["x-antidistill-body-sha256"] == hashlib.sha256(chat.content).hexdigest()
    assert "x-antidistill-grant" not in chat.headers, "the grant never leaves LiteLLM"


def test_each_send_gets_its_own_nonce_and_a_replay_is_refused(hook):
    s = signer(hook, default_tier="free")
    data = step1(s, SimpleNamespace(user_id="alice"))
    server = Antidistill()

    async def go() -> list[httpx.Response]:
        async with client_for(s, server) as client:
            url = API_BASE + "/chat/completions"
            first = await client.post(url, content=b'{"a":1}', headers=data["extra_headers"])
            retry = await client.post(url, content=b'{"a":1}', headers=data["extra_headers"])  # an SDK retry
            captured = {k: v for k, v in server.seen[0].headers.items() if k in SIGNED_HEADERS}
            raw = httpx.AsyncClient(transport=httpx.MockTransport(server))  # a replay, hook-less
            replay = await raw.post(url, content=b'{"a":1}', headers=captured)
            other = await raw.post(url, content=b'{"a":2}', headers=captured)
            await raw.aclose()
            return [first, retry, replay, other]

    first, retry, replay, other = asyncio.run(go())
    assert first.status_code == retry.status_code == 200
    nonces = {r.headers["x-antidistill-nonce"] for r in server.seen[:2]}
    assert len(nonces) == 2, "every send is signed afresh"
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    assert other.status_code == 401 and "does not cover this body" in other.json()["error"]["message"]


def test_a_keys_own_metadata_never_names_the_tier(hook):
    owner_says_internal = SimpleNamespace(user_id="mallory", metadata={"antidistill_tier": "internal"})
    s = signer(hook, default_tier="free")
    response, server = send(s, step1(s, owner_says_internal))
    assert response.status_code == 200 and server.callers[0].tier_name == "free", "the default, not the key's choice"
    with pytest.raises(Exception, match="no antidistill tier") as err:
        step1(signer(hook), owner_says_internal)
    assert err.value.status_code == 403, "no default: refused by LiteLLM, not served at the key's choice"


def test_a_grant_is_valid_only_in_the_process_that_issued_it(hook):
    data = step1(signer(hook, default_tier="free"), SimpleNamespace(user_id="bob"))
    response, _ = send(signer(hook, default_tier="free"), data)
    assert response.status_code == 401 and "unsigned request" in response.json()["error"]["message"]


def test_team_metadata_names_the_tier(hook):
    s = signer(hook, default_tier="free")
    own, team = {"antidistill_tier": "internal"}, {"antidistill_tier": "pro"}
    user = SimpleNamespace(team_id="t1", user_id="bob", metadata=own, team_metadata=team)
    response, server = send(s, step1(s, user))
    assert response.status_code == 200
    assert (server.callers[0].tier_name, server.callers[0].account) == ("pro", "team:t1")


def test_the_operators_map_wins(hook, tmp_path):
    team = SimpleNamespace(team_id="t1", team_metadata={"antidistill_tier": "pro"})
    s = signer(hook, default_tier="free", tier_map={"team:t1": "internal", "user:carol": "pro"})
    response, server = send(s, step1(s, team))
    assert response.status_code == 200 and server.callers[0].tier_name == "internal", "over the team's metadata"
    response, server = send(s, step1(s, SimpleNamespace(user_id="carol", metadata={"antidistill_tier": "internal"})))
    assert server.callers[0].tier_name == "pro"
    inline = '{"team:t1": "pro"}'
    assert hook.load_tier_map(inline) == {"team:t1": "pro"}
    (tmp_path / "map.json").write_text(json.dumps({"user:dave": "free"}))
    assert hook.load_tier_map(str(tmp_path / "map.json")) == {"user:dave": "free"}
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"team:t2": "internal"}))
    assert hook.load_tier_map(str(tmp_path / "map.yaml")) == {"team:t2": "internal"}
    assert hook.load_tier_map(None) == {} and hook.load_tier_map("  ") == {}
    for bad, needle in (
        ('{"t1": "pro"}', "must be team:<id>, user:<id> or key:<hash>"),  # not namespaced: would never match
        ('{"team:t1": "two words"}', "is not a tier name"),
        ('["team:t1"]', "must be an object"),
        ("{not json", "ANTIDISTILL_TIER_MAP"),
        (str(tmp_path / "missing.yaml"), "missing.yaml"),
    ):
        with pytest.raises(ValueError, match=needle):
            hook.load_tier_map(bad)


def test_accounts_are_namespaced(hook):
    assert hook.account_of(SimpleNamespace(team_id="acme", user_id="alice")) == "team:acme"
    assert hook.account_of(SimpleNamespace(user_id="alice")) == "user:alice"
    key = hook.account_of(SimpleNamespace(token="0123456789abcdef0123"))
    assert key == "key:" + hashlib.sha256(b"0123456789abcdef0123").hexdigest()[:32], "the token is not sent"
    spaced = hook.account_of(SimpleNamespace(user_id="Alice Smith"))
    assert spaced.startswith("user:sha256-") and len(spaced) == len("user:sha256-") + 32
    assert hook.account_of(SimpleNamespace(team_id="x" * 200)).startswith("team:sha256-")
    with pytest.raises(Exception, match="no team, user or token") as err:
        step1(signer(hook, default_tier="free"), SimpleNamespace())
    assert err.value.status_code == 403
    s = signer(hook, default_tier="free")
    _, server = send(s, step1(s, SimpleNamespace(team_id="acme")))
    assert server.callers[0].account == "team:acme", "never the server's configured account 'acme' by accident"


def test_client_copies_and_forged_grants_are_dropped(hook):
    s = signer(hook, default_tier="free")
    user = SimpleNamespace(user_id="bob")
    forged = {"x-antidistill-tier": "internal", "X-ANTIDISTILL-GRANT": "internal user:bob 9999999999 " + "0" * 64}
    data = step1(s, user, {"extra_headers": {**forged, "X-Other": "1"}})
    assert data["extra_headers"]["X-Other"] == "1", "other headers are kept"
    assert sorted(k.lower() for k in data["extra_headers"]) == ["x-antidistill-grant", "x-other"]
    response, server = send(s, data)
    assert response.status_code == 200 and server.callers[0].tier_name == "free"
    assert sorted(k for k in server.seen[0].headers if k.startswith("x-antidistill-")) == sorted(SIGNED_HEADERS)
    passed = step1(s, user, {"input": "x", "extra_headers": forged}, "aembedding")
    assert passed == {"input": "x", "extra_headers": {}}, "other call types: unsigned, client copies dropped"
    response, server = send(s, {"extra_headers": forged})  # a forged grant that bypassed step 1
    assert response.status_code == 401 and "unsigned request" in response.json()["error"]["message"]
    assert not [k for k in server.seen[0].headers if k.startswith("x-antidistill-")], "nothing forged is forwarded"
    expired = s.grant("free", "user:bob", now=0)
    response, _ = send(s, {"extra_headers": {"x-antidistill-grant": expired}})
    assert response.status_code == 401


def test_signed_headers_go_only_to_antidistill(hook):
    s = signer(hook, default_tier="free")
    data = step1(s, SimpleNamespace(user_id="bob"))
    for url in (
        "http://elsewhere:8000/v1/chat/completions",
        "https://antidistill:8000/v1/chat/completions",
        "http://antidistill:8001/v1/chat/completions",
        "http://antidistill:8000/v1beta/chat/completions",
    ):
        response, server = send(s, data, url)
        assert not [k for k in server.seen[0].headers if k.startswith("x-antidistill-")], url
    response, server = send(s, data, API_BASE + "/completions")
    assert response.status_code == 200


def test_start_up_refuses_what_cannot_work(hook):
    with pytest.raises(ValueError, match="ANTIDISTILL_GATEWAY_SECRET"):
        hook.AntidistillSigner(secret="short", api_base=API_BASE)
    with pytest.raises(ValueError, match="ANTIDISTILL_API_BASE"):
        hook.AntidistillSigner(secret=SECRET, api_base="")
    assert hook.proxy_handler_instance.api_base == httpx.URL(API_BASE), "the module's instance reads the environment"
