"""Tier strength: λ = strength / s per profile, both reported, and a clear stop when s is unknown."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import yaml
from antidistill.proxy_worker.core.strength import ADD_SCALE, ProfileScales, lambda_for, strength_of
from antidistill.proxy_worker.runtime.settings import RequestArgs
from antidistill.server.embedded import setup as default_setup
from antidistill.server.gateway.accounting import Accounting, Exchange
from antidistill.server.gateway.admission import Admission
from antidistill.server.gateway.config import SCALES_ENV, GatewayConfig, GatewayConfigError
from antidistill.server.gateway.request import parse
from antidistill.server.startup.preflight import describe_tiers
from antidistill.server.tiers import Caller, TiersError, load_tiers

SCALES = ProfileScales(
    {"math": 400.0, "code": 20.0, "legacy": None},
    default="math",
    gradients={"math": "m.safetensors", "code": "c.safetensors", "legacy": "old.safetensors"},
    proxy="/models/proxy",
)


def tiers_file(tmp_path, tiers: dict) -> str:
    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump({"tiers": tiers}))
    return str(path)


def test_strength_becomes_lambda_over_the_profiles_scale(tmp_path):
    """The same strength is a different λ on each profile: b / s of the tier's own gradient (the
    default profile when the tier names none); ranges are converted alike."""
    path = tiers_file(
        tmp_path,
        {
            "free": {"strength": 1.0, "max_strength": 2.0},
            "coder": {"strength": 1.0, "min_strength": 0.5, "profile": "code"},
            "raw": {"lambda": 0.3},
        },
    )
    tiers = load_tiers(path, SCALES).spec.tiers
    free, coder, raw = tiers["free"], tiers["coder"], tiers["raw"]
    assert (free.lambda_, free.min_lambda, free.max_lambda) == (1 / 400, 1 / 400, 2 / 400)
    assert (coder.lambda_, coder.min_lambda, coder.max_lambda) == (1 / 20, 0.5 / 20, 1 / 20)
    assert (raw.lambda_, raw.strength) == (0.3, None), "a lambda: tier is read as before"
    channels = free.side_channels(free.lambda_, escalated=False)
    assert channels.max_logprobs == 0 and not channels.prompt_logprobs, "a strength tier is protected like a λ one"


def test_lambda_and_strength_round_trip():
    assert lambda_for(strength_of(0.004, 250.0), 250.0) == pytest.approx(0.004)
    assert SCALES.strength(0.05, "code") == pytest.approx(1.0)
    assert SCALES.strength(0.0025, None) == pytest.approx(1.0), "None is the default profile"
    assert SCALES.strength(0.1, "legacy") is None and SCALES.strength(None, "math") is None


def test_a_strength_tier_on_a_scaleless_gradient_names_the_command_that_adds_it(tmp_path):
    path = tiers_file(tmp_path, {"old": {"strength": 1.0, "profile": "legacy"}})
    with pytest.raises(TiersError) as err:
        load_tiers(path, SCALES)
    message = str(err.value)
    assert "tiers.old" in message and "'legacy'" in message and "\n" not in message
    assert ADD_SCALE.format(proxy="/models/proxy", gradient="old.safetensors") in message
    legacy_lambda = tiers_file(tmp_path, {"old": {"lambda": 1.0, "profile": "legacy"}})
    assert load_tiers(legacy_lambda, SCALES).spec.tiers["old"].lambda_ == 1.0, "λ tiers need no scale"


@pytest.mark.parametrize(
    "tier,needle",
    [
        ({"strength": 1.0, "max_lambda": 0.1}, "not both"),
        ({"lambda": 0.1, "min_strength": 0.1}, "not both"),
        ({"min_strength": 0.5}, "need strength"),
        ({"strength": 1.0, "min_strength": 2.0}, "min_strength ≤ strength ≤ max_strength"),
        ({"strength": -1.0}, "tiers.t.strength"),
        ({"max_tokens": 10}, "needs lambda (λ) or strength"),
    ],
)
def test_bad_strength_tiers_name_the_problem(tmp_path, tier, needle):
    with pytest.raises(TiersError, match=f"tiers.yaml: .*{needle[:30]}".replace("(", r"\(").replace(")", r"\)")):
        load_tiers(tiers_file(tmp_path, {"t": tier}), SCALES)


def test_startup_lines_give_each_tier_its_lambda_and_strength(tmp_path):
    path = tiers_file(
        tmp_path, {"free": {"strength": 1.0, "max_strength": 2.0}, "old": {"lambda": 1.0, "profile": "legacy"}}
    )
    free, old = describe_tiers(load_tiers(path, SCALES))
    assert free == (
        "tier free (given as strength): λ 0.0025 [0.0025, 0.005] on profile math, strength 1 [1, 2] at Δ scale 400"
    )
    assert old.startswith("tier old (given as lambda): λ 1 [1, 1] on profile legacy, strength unknown")


def test_scales_travel_to_the_gateway_and_bad_ones_stop_it(tmp_path):
    env: dict[str, str] = {}
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", scales=SCALES).export(env)
    assert GatewayConfig.from_env(env).scales == SCALES
    env[SCALES_ENV] = json.dumps({"scales": {"math": -3}})
    with pytest.raises(GatewayConfigError, match="profile math: Δ scale must be a finite number > 0"):
        GatewayConfig.from_env(env)


def test_response_labels_and_audit_carry_lambda_and_strength(tmp_path):
    """The labels a response gets and its audit line: λ as applied and what it is as a strength."""
    accounting = Accounting("-", audit_text=False)
    lines: list[str] = []
    accounting.audit = logging.getLogger("tests.strength.audit")
    accounting.audit.addHandler(ListHandler(lines))
    accounting.audit.setLevel(logging.INFO)
    ex = Exchange(Caller("abc", "free", None), "/v1/completions", 0.0, decided(0.0025, "math", strength=1.0))
    assert labels(accounting, ex)[b"x-antidistillation-lambda"] == b"0.0025"
    assert labels(accounting, ex)[b"x-antidistillation-strength"] == b"1"
    accounting.finish(ex)
    line = json.loads(lines[-1])
    assert (line["lambda"], line["strength"], line["profile"]) == (0.0025, 1.0, "math")
    unknown = Exchange(Caller("abc", "old", None), "/v1/completions", 0.0, decided(1.0, "legacy", strength=None))
    assert b"x-antidistillation-strength" not in labels(accounting, unknown), "no scale: no strength is claimed"


class ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


def decided(lam: float, profile: str, strength: float | None) -> Admission:
    """An admission at ``lam`` on ``profile`` (what the gate hands the router)."""
    request = parse("/v1/completions", b'{"model": "m", "prompt": "x"}').request
    return Admission(request, RequestArgs(lam, profile), False, False, False, False, 1, 1, 16, strength)


def labels(accounting: Accounting, ex: Exchange) -> dict[bytes, bytes]:
    """The headers ``accounting`` adds to a response for ``ex``."""
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(accounting.labelled(send, ex)({"type": "http.response.start", "status": 200, "headers": []}))
    return dict(sent[0]["headers"])


def test_demo_tiers_are_strengths_and_a_cached_file_keeps_its_keys(tmp_path, capsys):
    """``make serve``'s tiers load as strength tiers on the embedded gradient's scale; a tiers file
    cached by an older version gets this version's tiers and keeps the keys already handed out."""
    path = tmp_path / "demo-tiers.yaml"
    default_setup.demo_tiers(path)
    keys = yaml.safe_load(path.read_text())["keys"]
    scales = ProfileScales({"math": 470.0}, default="math")
    tiers = load_tiers(path, scales).spec.tiers
    assert tiers["free"].strength == default_setup.DEMO_TIERS["free"]["strength"]
    assert tiers["free"].lambda_ == pytest.approx(default_setup.DEMO_TIERS["free"]["strength"] / 470.0)
    path.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 0.002}}, "keys": keys}))
    default_setup.demo_tiers(path)
    cached = yaml.safe_load(path.read_text())
    assert cached["tiers"] == default_setup.DEMO_TIERS and cached["keys"] == keys
    assert "updated" in capsys.readouterr().out


def test_a_strength_tier_on_a_profile_that_is_not_loaded_says_so(tmp_path):
    path = tiers_file(tmp_path, {"t": {"strength": 1.0, "profile": "nowhere"}})
    with pytest.raises(TiersError, match=r"tiers.t: .*'nowhere' is not one \(loaded: math, code, legacy\)"):
        load_tiers(path, SCALES)
