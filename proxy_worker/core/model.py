"""A minimal decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) with a leading *copy*
dimension: C weight sets (θ+εg and θ−εg) run in ONE pass as batched matmuls.

A tensor held once (copy dimension 1: the layers a restricted Δ mode's g leaves alone) broadcasts
against the others, so the residual stream has one copy until the first layer whose weights differ
and two from there on: the shared trunk runs once (core/delta_mode.py).

``transformer_forward`` is a pure function of the parameters, so the same code serves the
two-copy serving pass, the exact JVP (``torch.func.jvp`` over one copy) and the gradient tool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.flex_attention import flex_group_attention
from antidistill.proxy_worker.core.packed_linear import GemmPath, PackedLinear, pack_linears, use_packed
from antidistill.proxy_worker.core.plan import PAD_SLACK, AttentionGroup, StepPlan
from antidistill.proxy_worker.core.rope import RotaryTable, apply_rotary

Params = Mapping[str, torch.Tensor]
Linears = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
Output = Literal["last", "all"] | torch.Tensor


@dataclass
class KVStore:
    """Paged key/value storage for every layer and copy: ``k[layer]`` is [C_layer, kv_heads, slots,
    head_dim], with C_layer the copies that layer's weights have (1 for a shared trunk layer)."""

    k: Sequence[torch.Tensor]
    v: Sequence[torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32 (fp64 stays fp64: ground-truth runs), cast back, then scale.
    ``weight`` broadcasts over copies."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-copy ``x @ W.T (+ b)``: x [C, N, in], W [C, out, in] → [C, N, out] (one batched matmul)."""
    out = torch.matmul(x, weight.transpose(-1, -2))
    return out if bias is None else out + bias[:, None, :]


def project(params: Params, linears: Linears | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """The linear layer ``name`` (+ its ``_bias``): prepacked where ``linears`` has it, else ``linear``."""
    if linears is not None and name in linears:
        return linears[name](x)
    return linear(x, params[name], params.get(name + "_bias"))


def attention(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """Causal (optionally windowed) grouped-query attention for packed rows, one group at a time.

    q: [C, N, Hq, D]; k_store/v_store: [C, Hkv, S, D] (a paged cache or the pass's own k/v).
    Returns [C, N, Hq*D] in the packed token order. Groups run one after another, so the
    transients of a layer are those of its largest group (see ``attention_bytes``). A group
    planned with block lists (``attention="flex"``) reads the paged store in place instead.
    """
    parts = [
        group_attention(q, k_store, v_store, group, scale)
        if group.paged is None
        else flex_group_attention(q, k_store, v_store, group, scale)
        for group in plan.groups
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if plan.order is None else out[:, plan.order]


def group_attention(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Attention of one group's rows on their padded [b, S, T] grid → [C, valid queries, Hq*D].

    The store is head-major so one ``index_select`` gathers every row's prefix contiguously and
    the matmuls batch over (copy, kv head, row) without further copies. Scaling and masking are
    in place: the scores and the probabilities are the only grid-sized tensors alive at once.
    """
    c, _, hq, d = q.shape
    hkv = k_store.shape[1]
    g = hq // hkv
    b, smax = group.query_index.shape
    tmax = group.kv_index.shape[1]
    kb, vb = (gather_keys(store, group).view(c, hkv, b, tmax, d) for store in (k_store, v_store))
    qb = q[:, group.query_index].view(c, b, smax, hkv, g, d).permute(0, 3, 1, 4, 2, 5)
    scores = torch.matmul(qb.reshape(c, hkv, b, g * smax, d), kb.transpose(-1, -2)).mul_(scale)
    scores = scores.view(c, hkv, b, g, smax, tmax).masked_fill_(~group.mask[None, None, :, None], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    del scores
    out = torch.matmul(probs.view(c, hkv, b, g * smax, tmax), vb)
    out = out.view(c, hkv, b, g, smax, d).permute(0, 2, 4, 1, 3, 5).reshape(c, b, smax, hq * d)
    return out[:, group.query_valid]


def gather_keys(store: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """The group's keys (or values) [C, Hkv, b·T, D], copied out of the store [C, Hkv, slots, D]:
    whole blocks at a time where the plan has them (one index per block_size keys), else slot by slot."""
    if group.kv_blocks is None:
        return store.index_select(2, group.kv_index.reshape(-1))
    block_size = group.kv_index.shape[1] // group.kv_blocks.shape[1]
    blocks = store.unflatten(2, (-1, block_size)).index_select(2, group.kv_blocks.reshape(-1))
    return blocks.flatten(2, 3)


def attention_bytes(
    cfg: ProxyConfig, copies: int, elem: int, queries: Sequence[int], keys: Sequence[int], block_size: int = 1
) -> int:
    """Upper bound on one layer's attention transients for rows with these new-token counts
    (``queries``, S_i) and key counts (``keys``, T_i = start + S_i); ``elem`` = serving dtype bytes;
    ``block_size``: the paged store's (a group's key grid is rounded up to whole blocks, so each
    T_i counts as T_i + block_size − 1).

    Per padded grid cell and (copy, query head): the scores and the probabilities, plus an fp32
    copy of the scores below fp32 (``cell`` = 8 bytes in fp32, 10 in bf16/fp16, 16 in fp64); per
    padded key and (copy, kv head): the gathered key and value; per padded query and (copy, query
    head): the gathered query and the output (two copies each). Grouping pads a row to at most
    ``PAD_SLACK`` × its own grid, hence at most ``PAD_SLACK`` × its queries and keys, so

        bytes ≤ PAD_SLACK · copies · (cell·Hq·Σ S_i·T_i + 2·elem·Hkv·D·Σ T_i + 4·elem·Hq·D·Σ S_i)

    — proportional to the query-key pairs in the pass, not rows × longest chunk.
    """
    keys = [t + block_size - 1 for t in keys]
    pairs = sum(s * t for s, t in zip(queries, keys, strict=True))
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cell = 2 * max(elem, 4) + (elem if elem < 4 else 0)
    return PAD_SLACK * copies * (cell * hq * pairs + 2 * elem * hkv * d * sum(keys) + 4 * elem * hq * d * sum(queries))


def step_bytes(
    cfg: ProxyConfig, copies: int, elem: int, queries: Sequence[int], keys: Sequence[int], block_size: int = 1
) -> int:
    """Upper bound on the peak transient bytes of one pass (KV store and weights excluded).

    One layer's attention (``attention_bytes``; layers run one after another) plus, per new token
    and copy, the residual stream, norms, q/k/v with their rotary copies and the MLP's
    gate/up/product (≤ elem · (6·H + 3·(Hq + 2·Hkv)·D + 4·I)), plus, per row and copy, the
    logits with their fp32 log-softmax and Δ (≤ 16·V):

        bytes ≤ attention_bytes + copies · (elem · N · (6·H + 3·(Hq+2·Hkv)·D + 4·I) + 16 · B · V)

    where N = Σ S_i and B = rows.
    """
    n, rows = sum(queries), len(queries)
    per_token = 6 * cfg.hidden_size + 3 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token += 4 * cfg.intermediate_size
    return attention_bytes(cfg, copies, elem, queries, keys, block_size) + copies * (
        elem * n * per_token + 16 * rows * cfg.vocab_size
    )


def transformer_forward(
    params: Params,
    cfg: ProxyConfig,
    rope: RotaryTable,
    plan: StepPlan,
    kv: KVStore | None = None,
    output: Output = "last",
    linears: Linears | None = None,
) -> torch.Tensor:
    """Logits [C, B, V] for each row's newest token (``"last"``), [C, N, V] for every new token
    (``"all"``), or [C, K, V] for the packed token indices given as a tensor.

    With ``kv`` the new keys/values are written into the paged store and attention reads each
    row's whole prefix from it; without, the pass attends over its own tokens (full forward).
    ``linears`` replaces the named linear weights of ``params`` (prepacked weights).
    """
    embed = params["embed"]
    dtype = embed.dtype
    x = embed[:, plan.tokens]
    n = x.shape[1]
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope.lookup(plan.positions, dtype)
    eps, scale = cfg.rms_norm_eps, d**-0.5
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        h = rms_norm(x, params[p + "attn_norm"][:, None, :], eps)
        qkv = project(params, linears, p + "qkv", h)
        c = qkv.shape[0]  # this layer's copies: 1 in a shared trunk, else 2
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        q, k, v = q.view(c, n, hq, d), k.view(c, n, hkv, d), v.view(c, n, hkv, d)
        if cfg.qk_norm:
            q = rms_norm(q, params[p + "q_norm"][:, None, None, :], eps)
            k = rms_norm(k, params[p + "k_norm"][:, None, None, :], eps)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if kv is None:
            k_store, v_store = k, v
        else:
            kv.k[layer].index_copy_(2, plan.write_index, k)
            kv.v[layer].index_copy_(2, plan.write_index, v)
            k_store, v_store = kv.k[layer], kv.v[layer]
        x = x + project(params, linears, p + "o", attention(q, k_store, v_store, plan, scale))
        h = rms_norm(x, params[p + "mlp_norm"][:, None, :], eps)
        gate, up = project(params, linears, p + "gate_up", h).chunk(2, dim=-1)
        x = x + project(params, linears, p + "down", F.silu(gate) * up)
    if isinstance(output, torch.Tensor):
        x = x[:, output]
    elif output == "last":
        x = x[:, plan.last_index]
    x = rms_norm(x, params["norm"][:, None, :], eps)
    return project(params, linears, "lm_head", x)


class StackedProxy:
    """The proxy's C weight copies in the serving dtype, ready to run batched passes.

    ``gemm="packed"`` prepacks the linear weights for oneDNN (fp32 on CPU, ``packed_linear.py``)
    and keeps only the packed copy of them; embeddings and norms stay plain tensors in ``params``.
    The default, ``"matmul"``, keeps every weight plain.
    """

    def __init__(
        self, cfg: ProxyConfig, params: Params, device: torch.device | str = "cpu", gemm: GemmPath = "matmul"
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.params = {k: v.to(device) for k, v in params.items()}
        self.rope = RotaryTable(cfg, device)
        self.linears: dict[str, PackedLinear] = {}
        if use_packed(gemm, self.device, self.dtype):
            self.linears = pack_linears(self.params, cfg.num_layers)
            for name in self.linears:
                self.params.pop(name)
                self.params.pop(name + "_bias", None)

    @property
    def copies(self) -> int:
        """Copies of the output (the logits): 2 for a θ ± εg pair, whichever layers differ."""
        return self._copies_of("lm_head")

    @property
    def layer_copies(self) -> list[int]:
        """Copies of each layer's weights, hence of its KV (1: shared by both perturbed copies)."""
        return [self._copies_of(f"layers.{layer}.qkv") for layer in range(self.cfg.num_layers)]

    def _copies_of(self, name: str) -> int:
        return len(self.linears[name].weights) if name in self.linears else self.params[name].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.params["embed"].dtype

    @property
    def parameter_bytes(self) -> int:
        plain = sum(t.numel() * t.element_size() for t in self.params.values())
        return plain + sum(lin.nbytes for lin in self.linears.values())

    @torch.inference_mode()
    def logits(self, plan: StepPlan, kv: KVStore | None = None, output: Output = "last") -> torch.Tensor:
        return transformer_forward(self.params, self.cfg, self.rope, plan, kv, output, self.linears)
