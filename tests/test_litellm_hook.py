"""deploy/litellm/antidistill_signing.py (the LiteLLM callback) signs what the server's verifier accepts.

The callback runs inside LiteLLM, which this project does not install: when LiteLLM is absent its one
import (the ``CustomLogger`` base class, which has no behaviour the callback uses) is provided as an
empty class, so the callback's own code — tier, account, path and signature — is what is tested. The
run against LiteLLM's real proxy is described in docs/trusted-gateway.md ("What was validated")."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from antidistill.server.tiers import TiersFile, TierTable
from antidistill.server.trusted_gateway import GatewayVerifier

HOOK = Path(__file__).resolve().parents[1] / "deploy" / "litellm" / "antidistill_signing.py"
SECRET = "litellm-hook-test-" + "a1" * 20
TIERS = TierTable(TiersFile.model_validate({"tiers": {"free": {"lambda": 3.0}, "pro": {"lambda": 1.0}}}), "test")


@pytest.fixture(scope="module")
def hook():
    mp = pytest.MonkeyPatch()  # the stand-in modules and the secret exist only while the file loads
    if importlib.util.find_spec("litellm") is None:
        base = types.ModuleType("litellm.integrations.custom_logger")
        base.CustomLogger = type("CustomLogger", (), {})
        for name in ("litellm", "litellm.integrations"):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        mp.setitem(sys.modules, "litellm.integrations.custom_logger", base)
    mp.setenv("ANTIDISTILL_GATEWAY_SECRET", SECRET)
    try:
        spec = importlib.util.spec_from_file_location("antidistill_signing", HOOK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    return module


def run(signer, user, data: dict, call_type: str) -> dict:
    return asyncio.run(signer.async_pre_call_hook(user, None, data, call_type))


def identify(headers: dict[str, str], path: str):
    scope = {"path": path, "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return GatewayVerifier(SECRET).identify(scope, TIERS)


def test_chat_and_text_completions_are_signed_for_their_upstream_paths(hook):
    signer = hook.proxy_handler_instance
    user = SimpleNamespace(team_id="team-acme", metadata={"antidistill_tier": "pro"})
    chat = run(signer, user, {"model": "m", "extra_headers": {"X-Other": "1"}}, "acompletion")
    assert chat["extra_headers"]["X-Other"] == "1", "other headers are kept"
    caller = identify(chat["extra_headers"], "/v1/chat/completions")
    assert (caller.tier_name, caller.account) == ("pro", "team-acme")
    text = run(signer, user, {"model": "m"}, "atext_completion")
    assert identify(text["extra_headers"], "/v1/completions").tier_name == "pro"
    with pytest.raises(Exception, match="invalid gateway signature"):
        identify(text["extra_headers"], "/v1/chat/completions")


def test_tier_and_account_fall_back_in_order(hook):
    signer = hook.AntidistillSigner(secret=SECRET, default_tier="free")
    team = SimpleNamespace(metadata={}, team_metadata={"antidistill_tier": "pro"}, user_id="alice")
    assert identify(run(signer, team, {}, "acompletion")["extra_headers"], "/v1/chat/completions").account == "alice"
    bare = SimpleNamespace(token="0123456789abcdef0123")
    caller = identify(run(signer, bare, {}, "acompletion")["extra_headers"], "/v1/chat/completions")
    assert (caller.tier_name, caller.account) == ("free", "key-0123456789abcdef")
    spaced = SimpleNamespace(user_id="Alice Smith")
    account = identify(run(signer, spaced, {}, "acompletion")["extra_headers"], "/v1/chat/completions").account
    assert account.startswith("sha256-"), "a name the server would refuse is hashed, not sent"


def test_client_copies_are_dropped_and_untiered_keys_refused(hook):
    signer = hook.AntidistillSigner(secret=SECRET, default_tier="")
    user = SimpleNamespace(metadata={"antidistill_tier": "free"}, user_id="bob")
    forged = {"x-antidistill-tier": "pro", "X-ANTIDISTILL-SIGNATURE": "0" * 64}
    headers = run(signer, user, {"extra_headers": forged}, "acompletion")["extra_headers"]
    assert sorted(k.lower() for k in headers) == sorted(
        ["x-antidistill-tier", "x-antidistill-account", "x-antidistill-timestamp", "x-antidistill-signature"]
    )
    assert identify(headers, "/v1/chat/completions").tier_name == "free"
    with pytest.raises(Exception, match="no antidistill tier") as err:
        run(signer, SimpleNamespace(user_id="carol"), {}, "acompletion")
    assert err.value.status_code == 403
    assert run(signer, user, {"input": "x"}, "aembedding") == {"input": "x"}, "other call types pass unsigned"
    with pytest.raises(ValueError, match="ANTIDISTILL_GATEWAY_SECRET"):
        hook.AntidistillSigner(secret="short")
