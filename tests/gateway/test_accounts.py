"""Accounts in the tiers file: keys that name one share its limits and escalation (pure units; the
shared state is tested against Redis in test_shared_limits, over HTTP in test_shared_state_server)."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.limits.memory import MemoryState, scopes_for
from antidistill.server.tiers import TiersError, load_tiers, new_key

ACCOUNTS = {"acme": {"rpm": 2, "escalation": {"tokens_per_hour": 50, "lambda": 4}}}


def tiers_file(tmp_path, accounts=ACCOUNTS, account="acme"):
    keys, entries = [], []
    for _ in range(2):
        key, digest = new_key()
        keys.append(key)
        entries.append({"sha256": digest, "tier": "pro", "account": account})
    spec = {"tiers": {"pro": {"lambda": 1.0, "rpm": 10}}, "keys": entries, "accounts": accounts}
    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, keys


def test_keys_of_an_account_share_its_limits_and_escalation(tmp_path):
    path, (k1, k2) = tiers_file(tmp_path)
    table = load_tiers(path)
    c1, c2 = table.identify(k1), table.identify(k2)
    assert c1.account == c2.account == "acme" and c1.key_id != c2.key_id
    s1, s2 = (scopes_for(c, table.account(c.account)) for c in (c1, c2))
    assert [s.id for s in s1] == [f"key:{c1.scope_id}", "account:acme"] and s1[1] == s2[1]
    assert len(c1.scope_id) == 64, "a key's limits are named by its full digest: no two keys share them"

    async def body():
        state = MemoryState()
        g = await state.admit(s1, 5)
        await state.release(g.lease, 60)  # one key's volume escalates the whole account
        assert (await state.admit(s2, 5)).escalated == 4
        with pytest.raises(Refusal, match="account 'acme': more than 2 requests per minute"):
            await state.admit(s1, 5)
        assert state.known_escalation(s1[:1]) is None, "the key alone is under no escalation rule"

    asyncio.run(body())


@pytest.mark.parametrize(
    ("accounts", "account", "field"),
    [
        (ACCOUNTS, "acem", "keys.0.account: unknown account 'acem' (defined: acme)"),
        ({}, "acme", "keys.0.account: unknown account 'acme' (defined: none)"),
        ({"acme": {"rpm": 0}}, "acme", "accounts.acme.rpm"),
        ({"acme": {"burst": 3}}, "acme", "accounts.acme.burst"),
        ({"acme": {"escalation": {"lambda": 2}}}, "acme", "accounts.acme.escalation.tokens_per_hour"),
    ],
)
def test_account_errors_name_the_field(tmp_path, accounts, account, field):
    path, _ = tiers_file(tmp_path, accounts, account)
    with pytest.raises(TiersError) as err:
        load_tiers(path)
    assert field in str(err.value)
