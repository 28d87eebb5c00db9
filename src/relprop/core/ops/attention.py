"""Attention as one node: `F.scaled_dot_product_attention`, `nn.MultiheadAttention` (packed
in-projection) and torchvision's Swin (v1) window attention, each decomposed into projections
around `softmax(s·QKᵀ + bias)·V` and recomputed from its parameters (checked against the
recorded output).

Strategies (``attention=`` of a `Composite`, by object or name):
- `ConservativeAttention` (``"cp"``, the default): the attention weights are held constant, as
  Ali et al. (ICML 2022, "XAI for Transformers: better explanations through conservative
  propagation") do; `A·V` is then linear in V and the ε-rule sends all relevance to V. Nothing
  is lost: relevance is conserved up to ε. A gated product outside attention (scale.py) holds
  its gate constant likewise (signal-take-all); one whose gate the graph cannot tell takes the
  uniform rule below (`ConservativeAttention(ambiguous="refuse")` refuses it instead).
- `AttnLRP` (``"attnlrp"``, Achtibat et al., ICML 2024; their code: LXT): the two matmuls `QKᵀ`
  and `A·V` take the uniform rule for bilinear products (the ε-rule's decomposition, half to
  each operand), softmax takes their Taylor-derived rule `R_x = x ⊙ (R_s − s ⊙ Σ R_s)`. The
  softmax rule does not conserve: the difference is the relevance of the logits' shift
  (reported in docs/rules.md as the attention leak). Gated products take the same uniform rule.
A constant additive bias in the logits (relative position bias, masks) gets no relevance: the
input-dependent scores keep it (the policy for every constant operand, see docs/rules.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from relprop.core.aliases import named
from relprop.core.linear_op import LinearOp
from relprop.core.numerics import largest_gap, vjp
from relprop.core.ops.base import Context, Op, Parents, describe
from relprop.core.ops.matmul import EPSILON, bilinear_relevance
from relprop.core.ops.softmax import softmax_relevance
from relprop.core.rules import Rule
from relprop.errors import ConfigError, FidelityError, UnsupportedLayerError


class AttentionStrategy(Protocol):
    def weights_and_values(self, product: Callable[[Tensor, Tensor], Tensor], weights: Tensor, values: Tensor,
                           R: Tensor, epsilon: float = EPSILON, output: Tensor | None = None
                           ) -> tuple[Tensor | None, Tensor]:
        """Relevance of `A` (None: it gets none) and of `V` in `A·V` (`output`: `A·V` as the
        forward pass computed it, where it is at hand)."""
        ...

    def scores(self, scores: Tensor, weights: Tensor, R_weights: Tensor, dim: int) -> Tensor:
        """Relevance of the attention logits from the relevance of the softmax weights."""
        ...

    def gated_product(self, a: Tensor, b: Tensor, R: Tensor, gate: int | None
                      ) -> tuple[Tensor | None, Tensor | None]:
        """Relevance of the factors of an elementwise `a * b` of two unrelated input-dependent
        tensors, `gate` the index of the one the graph reads as the gate (None: unknown); (None,
        None) when this strategy cannot decide."""
        ...


class _SoftmaxTaylor:
    def scores(self, scores: Tensor, weights: Tensor, R_weights: Tensor, dim: int) -> Tensor:
        return softmax_relevance(scores, weights, R_weights, dim)


@dataclass(frozen=True)
class ConservativeAttention(_SoftmaxTaylor):
    """The attention weights held constant: all relevance of `A·V` to V (conserves). A gated
    product whose gate the graph cannot tell takes the uniform rule (`ambiguous="uniform"`, the
    default: conserving, symmetric, no guess at which factor is the signal) or is refused
    (`ambiguous="refuse"`)."""

    ambiguous: str = "uniform"
    holds_weights_constant: ClassVar[bool] = True  # the relevance reads neither q nor k

    def __post_init__(self) -> None:
        if self.ambiguous not in ("uniform", "refuse"):
            raise ConfigError(f"ConservativeAttention(ambiguous={self.ambiguous!r}): expected 'uniform' or 'refuse'")

    def weights_and_values(self, product, weights, values, R, epsilon=EPSILON, output=None):
        return None, bilinear_relevance(product, weights, values, R, share_a=0.0, epsilon=epsilon, output=output)[1]

    def gated_product(self, a, b, R, gate):
        """Signal-take-all (Arras et al. 2017): the gate held constant, as the attention weights;
        no gate known: the uniform rule (Achtibat et al. 2024, Prop. 3.3), or (None, None)."""
        if gate is None:
            if self.ambiguous == "refuse":
                return None, None
            return bilinear_relevance(torch.mul, a, b, R, share_a=0.5)
        return (None, R) if gate == 0 else (R, None)


@dataclass(frozen=True)
class AttnLRP(_SoftmaxTaylor):
    """AttnLRP's uniform bilinear rule at `A·V` and its softmax rule for the scores."""

    def weights_and_values(self, product, weights, values, R, epsilon=EPSILON, output=None):
        return bilinear_relevance(product, weights, values, R, share_a=0.5, epsilon=epsilon)

    def gated_product(self, a, b, R, gate):
        """The uniform rule: half of the ε-rule's decomposition of `a * b` to each factor."""
        return bilinear_relevance(torch.mul, a, b, R, share_a=0.5)


ATTENTION_STRATEGIES: dict[str, AttentionStrategy] = {"cp": ConservativeAttention(), "attnlrp": AttnLRP()}


def attention_strategy(attention: str | AttentionStrategy) -> AttentionStrategy:
    if not isinstance(attention, str):
        return attention
    return named(attention, ATTENTION_STRATEGIES, "attention rule")


def _swin_attention_types() -> tuple[type[nn.Module], ...]:
    """torchvision's Swin window attention, v1 and v2: leaves whose function is reproduced here."""
    try:  # optional: torchvision before 0.14 has no Swin
        from torchvision.models.swin_transformer import (
            ShiftedWindowAttention,
            ShiftedWindowAttentionV2,
        )
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (ShiftedWindowAttentionV2, ShiftedWindowAttention)


class Attention(Op):
    name = "attention"
    reads_its_arguments = reads_its_output = True
    modules = (nn.MultiheadAttention, *_swin_attention_types())

    functions = frozenset({F.scaled_dot_product_attention})

    def check_module(self, node: fx.Node, module: nn.Module) -> None:
        """The packed in-projection without extra key/value biases or zero-attention rows
        (torchvision's ViT) is what MultiheadParts reproduces; refuse the other variants."""
        if isinstance(module, nn.MultiheadAttention) and (
                module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim):
            raise UnsupportedLayerError(
                f"relprop supports {describe(node, module)} only with kdim = vdim = embed_dim, add_bias_kv=False "
                "and add_zero_attn=False; give it a rule (rules={nn.MultiheadAttention: rule}) or use that form"
            )

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        if step.module is not None:
            return attention_module_forward(step.module, args, kwargs)
        return super().forward(step, args, kwargs, model)

    def record(self, step, args: tuple, kwargs: dict, context: Context) -> tuple[Any, Any]:
        """An attention module's output computed by its decomposition, whose parts (projections,
        heads, weights, context) the relevance then uses as they are: nothing is recomputed, and
        the decomposition is what the fidelity check compares with the model's own output. Only
        the parts the composite reads are kept (CP reads neither q nor k; a rule that does not
        take its denominator from the output reads no projection's output). Calls asking for the
        attention weights run the module itself (checked in `relevance`)."""
        if isinstance(step.module, nn.MultiheadAttention) and kwargs.get("need_weights") is False:
            parts = MultiheadParts.of(step.module, *args, **kwargs)
            return (parts.output(), None), parts.trim(*_reads(context))
        if step.module is not None and not isinstance(step.module, nn.MultiheadAttention) and len(args) == 1 \
                and not kwargs:
            parts = WindowParts.of(step.module, args[0])
            return parts.output(), parts.trim(*_reads(context))
        output = self.forward(step, args, kwargs, context.model)
        if step.module is None and not _reads(context)[0]:
            return output, HeldWeights.of(*args, **kwargs)
        return output, None

    def backward_reads(self, step, context: Context) -> list[fx.Node] | None:
        """A `F.scaled_dot_product_attention` call under CP reads only what it keeps (the
        weights, V, `A·V`): neither q nor k, nor its output."""
        if step.module is None and not _reads(context)[0]:
            return []
        return super().backward_reads(step, context)

    def relevance(self, step, values, R, context: Context) -> Parents:
        node, strategy = step.node, context.strategies.attention
        args, kwargs = step.arguments(values)
        if step.module is None:  # F.scaled_dot_product_attention
            held = getattr(values, "parts", {}).get(node)
            if held is not None:
                return _to_query_key_value(step, (None, None, held.relevance(R, attention_strategy(strategy))))
            q, k, v, core = sdpa_core(*args, **kwargs)
            return _to_query_key_value(step, core.relevance_of_parts(q, k, v, R, attention_strategy(strategy)))
        R = R[0] if isinstance(R, list) else R
        rule = _projection_rule(context)
        kept = getattr(values, "parts", {}).get(node)
        if isinstance(step.module, nn.MultiheadAttention):
            parts = kept
            if parts is None:  # the module ran itself: its decomposition must agree with it
                parts = MultiheadParts.of(step.module, *args, **kwargs)
                _check_recomputed(parts.output(), values[node][0], node)
            return _to_query_key_value(step, parts.relevance(R, rule, strategy))
        x = values[node.args[0]]
        window_parts = kept
        if window_parts is None:
            window_parts = WindowParts.of(step.module, x)
            _check_recomputed(window_parts.output(), values[node], node)
        return [(node.args[0], window_parts.relevance(x, R, rule, strategy))]


def _reads(context: Context) -> tuple[bool, bool]:
    """(whether the attention strategy reads q and k, whether the projections' rule reads their
    outputs): what an attention's kept parts must hold."""
    strategy = attention_strategy(context.strategies.attention)
    rule = type(_projection_rule(context))
    return (not getattr(strategy, "holds_weights_constant", False),
            rule.relevance_from_output is not Rule.relevance_from_output)


def _from_output(rule: Rule, op: LinearOp, x: Tensor, R: Tensor, y: Tensor | None) -> Tensor:
    """A projection's relevance, its denominator from its recorded output `y` where kept."""
    return rule.relevance(op, x, R) if y is None else rule.relevance_from_output(op, x, R, y)


def _projection_rule(context: Context) -> Rule:
    """The rule of the projections inside an attention module: the user's rule for nn.Linear
    if any, else the default."""
    rule = context.rules.by_type(nn.Linear)
    return rule if rule is not None else context.strategies.default_rule


def _to_query_key_value(step, parts) -> Parents:
    """An attention call's relevance for its query, key and value arguments, for those that
    depend on the input and received any (None: none)."""
    return [(arg, R_arg) for arg, R_arg in zip(step.node.args[:3], parts, strict=True)
            if isinstance(arg, fx.Node) and arg in step.inputs and R_arg is not None and bool(R_arg.any())]


def _check_recomputed(ours: Tensor, recorded: Tensor, node: fx.Node) -> None:
    """The attention module recomputed from its parts must give what the forward recorded."""
    gap = largest_gap(ours, recorded, 1e-4)
    if gap is not None:
        raise FidelityError(
            f"relprop's decomposition of '{node.target}' differs from its output (max |Δ| = {gap:.3g}); "
            "give that module a rule (rules={ItsType: rule})"
        )


@dataclass(frozen=True)
class AttentionCore:
    """`softmax(scale·q kᵀ + bias) v` on (..., tokens, dim) tensors; `bias` is additive
    (float) or a boolean keep-mask, as `F.scaled_dot_product_attention` takes it. `cosine`:
    Swin v2's cosine attention, `scale·(q/‖q‖)(k/‖k‖)ᵀ` with a per-head scale; its rule holds the
    norms constant (as LXT holds LayerNorm's std), so the logits stay bilinear in q and k."""

    scale: float | Tensor
    bias: Tensor | None = None
    epsilon: float = EPSILON  # of the bilinear ε-rules
    cosine: bool = False

    def logits(self, q: Tensor, k: Tensor) -> Tensor:
        if self.cosine:
            return (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.scale
        return (q * self.scale) @ k.transpose(-2, -1)

    def _bilinear_logits(self, q: Tensor, k: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """The logits as a bilinear function of (q, k), cosine norms held at this pass's values."""
        if not self.cosine:
            return lambda a, b: (a * self.scale) @ b.transpose(-2, -1)
        q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k_norm = k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return lambda a, b: ((a / q_norm) @ (b / k_norm).transpose(-2, -1)) * self.scale

    def biased(self, scores: Tensor) -> Tensor:
        if self.bias is None:
            return scores
        if self.bias.dtype == torch.bool:
            return scores.masked_fill(~self.bias, float("-inf"))
        return scores + self.bias

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.weights(q, k) @ v

    def weights(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.softmax(self.biased(self.logits(q, k)), -1)

    def relevance(self, q: Tensor, k: Tensor, v: Tensor, R: Tensor, strategy: str | AttentionStrategy
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Relevance of (q, k, v) for the output relevance R (`strategy` by object or name)."""
        R_q, R_k, R_v = self.relevance_of_parts(q, k, v, R, attention_strategy(strategy))
        return (torch.zeros_like(q) if R_q is None else R_q, torch.zeros_like(k) if R_k is None else R_k, R_v)

    def relevance_of_parts(self, q: Tensor, k: Tensor, v: Tensor, R: Tensor, strategy: AttentionStrategy,
                           weights: Tensor | None = None, output: Tensor | None = None
                           ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """`relevance`, given what the forward pass kept (the weights, `A·V`): nothing is
        recomputed that the strategy does not read; q and k get None when they get nothing (CP)."""
        scores = None
        if weights is None:
            scores = self.biased(self.logits(q, k))
            weights = torch.softmax(scores, -1)
        R_weights, R_v = strategy.weights_and_values(torch.matmul, weights, v, R, self.epsilon, output=output)
        if R_weights is None:
            return None, None, R_v
        if scores is None:
            scores = self.biased(self.logits(q, k))
        R_scores = strategy.scores(scores, weights, R_weights, -1)
        R_q, R_k = bilinear_relevance(self._bilinear_logits(q, k), q, k, R_scores, epsilon=self.epsilon)
        return R_q, R_k, R_v


def sdpa_core(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> tuple[Tensor, Tensor, Tensor, AttentionCore]:
    """`F.scaled_dot_product_attention`'s arguments as (q, k, v, core), dropout off (eval)."""
    if enable_gqa and query.shape[-3] != key.shape[-3]:
        raise UnsupportedLayerError("scaled_dot_product_attention with grouped-query heads (enable_gqa) "
                                    "is not supported")
    bias = attn_mask
    if is_causal:
        L, S = query.shape[-2], key.shape[-2]
        bias = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return query, key, value, AttentionCore(scale, bias)


@dataclass
class HeldWeights:
    """What CP reads of a `F.scaled_dot_product_attention` call, kept from the recording
    forward: the weights `softmax(s·QKᵀ + bias)`, V and `A·V` (the ε denominator), computed
    once as `AttentionCore` does (the fused call's own output differs from it in the last bits,
    so it cannot be the denominator); q and k are not kept."""

    weights: Tensor
    values: Tensor
    context: Tensor
    epsilon: float = EPSILON

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> HeldWeights:
        q, k, v, core = sdpa_core(*args, **kwargs)
        weights = core.weights(q, k)
        return cls(weights, v, weights @ v, core.epsilon)

    def relevance(self, R: Tensor, strategy: AttentionStrategy) -> Tensor:
        """The relevance of V, the weights held constant."""
        R_weights, R_v = strategy.weights_and_values(torch.matmul, self.weights, self.values, R, self.epsilon,
                                                     output=self.context)
        if R_weights is not None:
            raise ConfigError(f"{type(strategy).__name__} reads the attention logits: the held weights cannot serve it")
        return R_v


def attention_module_forward(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Eval-mode forward of an attention leaf (its dropout off), without touching the module."""
    training = module.training
    module.train(False)
    try:
        return module(*args, **kwargs)
    finally:
        module.train(training)


def _linear_op(layer: nn.Linear | None, weight: Tensor | None = None, bias: Tensor | None = None) -> LinearOp:
    if layer is not None:
        weight, bias = layer.weight, layer.bias
    return LinearOp(weight.detach().float(), None if bias is None else bias.detach().float())


def _fresh(op: LinearOp) -> LinearOp:
    """A copy of a kept projection for one rule call: what the rule caches on it (w⁺) goes with
    the call, instead of living as long as the record keeps the attention's parts."""
    return replace(op)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(…, tokens, heads·d) → (…, heads, tokens, d)."""
    *lead, tokens, width = x.shape
    return x.reshape(*lead, tokens, heads, width // heads).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(…, heads, tokens, d) → (…, tokens, heads·d)."""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


@dataclass
class MultiheadParts:
    """nn.MultiheadAttention (packed in-projection) as projections around an AttentionCore,
    recomputed from the module's parameters; batch-first inside."""

    inputs: tuple[Tensor, Tensor, Tensor]  # query, key, value, batch-first
    heads: tuple[Tensor | None, Tensor | None, Tensor]  # q, k, v: (batch, heads, tokens, d)
    core: AttentionCore
    in_ops: tuple[LinearOp, LinearOp, LinearOp]
    out_op: LinearOp
    context: Tensor  # the heads merged, (batch, tokens, embed), before out_proj
    batch_first: bool
    projected: tuple[Tensor | None, ...]  # the in-projections' outputs, before the heads split
    weights: Tensor | None = None  # the attention weights (batch, heads, tokens, tokens)
    out: Tensor | None = None  # out_proj's output, batch-first (set by `output`)

    @classmethod
    def of(cls, module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
           key_padding_mask: Tensor | None = None, need_weights: bool = True,
           attn_mask: Tensor | None = None, average_attn_weights: bool = True,
           is_causal: bool = False) -> MultiheadParts:
        E, heads = module.embed_dim, module.num_heads
        flip = not module.batch_first and query.dim() == 3
        inputs = tuple(x.transpose(0, 1) if flip else x for x in (query, key, value))
        weight, bias = module.in_proj_weight, module.in_proj_bias
        in_ops = tuple(_linear_op(None, weight[i * E:(i + 1) * E], None if bias is None else bias[i * E:(i + 1) * E])
                       for i in range(3))
        projected = tuple(op.forward(x, op.weight, op.bias) for op, x in zip(in_ops, inputs, strict=True))
        q, k, v = (split_heads(p, heads) for p in projected)
        mask = _multihead_mask(attn_mask, key_padding_mask, is_causal, q, k)
        core = AttentionCore(float((E // heads) ** -0.5), mask)
        weights = core.weights(q, k)
        context = merge_heads(weights @ v)
        return cls(inputs, (q, k, v), core, in_ops, _linear_op(module.out_proj), context, not flip, projected,
                   weights)

    def trim(self, reads_query_key: bool, reads_outputs: bool) -> MultiheadParts:
        """Drop what the relevance will not read (the record keeps the rest until the walk)."""
        if not reads_query_key:
            self.heads, self.projected = (None, None, self.heads[2]), (None, None, self.projected[2])
        if not reads_outputs:
            self.projected = (None, None, None)
        return self

    def output(self) -> Tensor:
        if self.out is None:
            self.out = self.out_op.forward(self.context, self.out_op.weight, self.out_op.bias)
        return self.out if self.batch_first else self.out.transpose(0, 1)

    def relevance(self, R: Tensor, rule: Rule, strategy: AttentionStrategy
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Relevance of (query, key, value) in the caller's layout (None: none); `rule` for the
        projections."""
        R = R if self.batch_first else R.transpose(0, 1)
        self.output()
        R_context = rule.relevance_from_output(_fresh(self.out_op), self.context, R, self.out)
        heads = self.heads[2].shape[-3]
        R_heads = self.core.relevance_of_parts(*self.heads, split_heads(R_context, heads),
                                               attention_strategy(strategy), self.weights,
                                               split_heads(self.context, heads))
        out: list[Tensor | None] = []
        for op, x, R_h, y in zip(self.in_ops, self.inputs, R_heads, self.projected, strict=True):
            if R_h is None or not bool(R_h.any()):
                out.append(None)
                continue
            R_x = _from_output(rule, _fresh(op), x, merge_heads(R_h), y)
            out.append(R_x if self.batch_first else R_x.transpose(0, 1))
        return out[0], out[1], out[2]


def _multihead_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
                    q: Tensor, k: Tensor) -> Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = not allowed; float: added) as one additive
    bias of shape broadcastable to (batch, heads, L, S)."""
    B, heads, L, _ = q.shape
    S = k.shape[-2]
    bias = torch.zeros(1, 1, L, S, dtype=q.dtype, device=q.device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        m = attn_mask.reshape(B, heads, L, S) if attn_mask.dim() == 3 else attn_mask
        bias = bias + (torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool
                       else m.to(q.dtype))
    if key_padding_mask is not None:
        m = key_padding_mask.reshape(B, 1, 1, S)
        bias = bias + (torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool
                       else m.to(q.dtype))
    return None if attn_mask is None and key_padding_mask is None else bias


@dataclass
class WindowParts:
    """torchvision's Swin `shifted_window_attention`: the element routing (pad, cyclic shift,
    window partition and their inverses), the qkv and output projections and an AttentionCore
    whose bias is the relative position bias plus the shift mask (constants). Swin v2 (a
    `logit_scale`): cosine attention, its key bias zeroed as torchvision does, and the bias
    `16·sigmoid(cpb_mlp(table))` of a constant coordinate table: a constant too."""

    x_shape: torch.Size
    window: tuple[int, int]
    shift: tuple[int, int]
    padded: tuple[int, int]
    heads_count: int
    qkv_op: LinearOp
    proj_op: LinearOp
    core: AttentionCore
    windows: Tensor  # (batch·windows, tokens, C): the qkv projection's input
    heads: tuple[Tensor | None, Tensor | None, Tensor]
    context: Tensor  # before proj
    projected: Tensor  # after proj, before the windows are put back
    qkv: Tensor | None = None  # the qkv projection's output (CP: its values' third only)
    weights: Tensor | None = None  # the attention weights
    values_only: bool = False  # CP: q and k get no relevance, the qkv rule sees the values' third

    @classmethod
    def of(cls, module: nn.Module, x: Tensor) -> WindowParts:
        B, H, W, C = x.shape
        window = (int(module.window_size[0]), int(module.window_size[1]))
        pad_H, pad_W = H + (window[0] - H % window[0]) % window[0], W + (window[1] - W % window[1]) % window[1]
        shift = tuple(0 if window[i] >= (pad_H, pad_W)[i] else int(module.shift_size[i]) for i in range(2))
        heads = module.num_heads
        logit_scale = getattr(module, "logit_scale", None)  # Swin v2
        qkv_op = _linear_op(module.qkv)
        if logit_scale is not None and qkv_op.bias is not None:  # v2 zeroes the key bias in every call
            bias = qkv_op.bias.clone()  # never the module's own parameter
            bias[bias.numel() // 3:2 * bias.numel() // 3] = 0
            qkv_op = LinearOp(qkv_op.weight, bias)
        parts = cls(x.shape, window, shift, (pad_H, pad_W), heads, qkv_op,
                    _linear_op(module.proj), None, None, None, None, None)  # type: ignore[arg-type]
        parts.windows = parts.partition(x)
        qkv = parts.qkv = parts.qkv_op.forward(parts.windows, parts.qkv_op.weight, parts.qkv_op.bias)
        tokens = parts.windows.shape[1]
        q, k, v = qkv.reshape(-1, tokens, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        bias = module.get_relative_position_bias().detach().float()  # (1, heads, tokens, tokens)
        if sum(shift) > 0:
            bias = (bias.unsqueeze(0) + parts._shift_mask(x).unsqueeze(1).unsqueeze(0)
                    ).expand(B, -1, heads, tokens, tokens).reshape(-1, heads, tokens, tokens)
        if logit_scale is None:
            parts.core = AttentionCore(float((C // heads) ** -0.5), bias)
        else:
            scale = torch.clamp(logit_scale.detach().float(), max=math.log(100.0)).exp()
            parts.core = AttentionCore(scale, bias, cosine=True)
        parts.heads = (q, k, v)
        parts.weights = parts.core.weights(q, k)
        parts.context = merge_heads(parts.weights @ v)
        parts.projected = parts.proj_op.forward(parts.context, parts.proj_op.weight, parts.proj_op.bias)
        return parts

    def partition(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → padded, shifted, windows (B·nW, wh·ww, C)."""
        B, H, W, C = x.shape
        (pad_H, pad_W), (wh, ww) = self.padded, self.window
        x = F.pad(x, (0, 0, 0, pad_W - W, 0, pad_H - H))
        if sum(self.shift) > 0:
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = x.view(B, pad_H // wh, wh, pad_W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, wh * ww, C)

    def unpartition(self, y: Tensor) -> Tensor:
        """The inverse: windows back in place, shift undone, padding cropped."""
        B, H, W, C = self.x_shape
        (pad_H, pad_W), (wh, ww) = self.padded, self.window
        y = y.view(B, pad_H // wh, pad_W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
        if sum(self.shift) > 0:
            y = torch.roll(y, shifts=self.shift, dims=(1, 2))
        return y[:, :H, :W, :]

    def _shift_mask(self, x: Tensor) -> Tensor:
        """−100 between tokens of a window that come from different regions of the shifted
        map (torchvision's constant), 0 within a region: (windows, tokens, tokens)."""
        (pad_H, pad_W), (wh, ww) = self.padded, self.window
        region = torch.zeros(pad_H, pad_W, device=x.device)
        bounds = [((0, pad - w), (pad - w, pad - s), (pad - s, pad)) for pad, w, s in
                  ((pad_H, wh, self.shift[0]), (pad_W, ww, self.shift[1]))]
        for i, (h0, h1) in enumerate(bounds[0]):
            for j, (w0, w1) in enumerate(bounds[1]):
                region[h0:h1, w0:w1] = 3 * i + j
        region = region.view(pad_H // wh, wh, pad_W // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        differs = region.unsqueeze(1) != region.unsqueeze(2)
        return torch.zeros_like(differs, dtype=x.dtype).masked_fill(differs, -100.0)

    def output(self) -> Tensor:
        return self.unpartition(self.projected)

    def trim(self, reads_query_key: bool, reads_outputs: bool) -> WindowParts:
        """Drop what the relevance will not read. Under CP only the values' third of the qkv
        projection carries relevance: its rule then runs on that third alone (a third of the
        products), and only that third of the qkv output is kept."""
        if not reads_query_key:  # the values' third, copied: no view that holds q and k alive
            self.values_only = True
            self.qkv = self.qkv[..., 2 * self.windows.shape[-1]:].clone()
            self.heads = (None, None, split_heads(self.qkv, self.heads_count))
        elif not reads_outputs:
            self.qkv = None
        return self

    def relevance(self, x: Tensor, R: Tensor, rule: Rule, strategy: AttentionStrategy) -> Tensor:
        R_projected = vjp(self.unpartition, self.projected, R)
        R_context = rule.relevance_from_output(_fresh(self.proj_op), self.context, R_projected, self.projected)
        R_q, R_k, R_v = self.core.relevance_of_parts(*self.heads, split_heads(R_context, self.heads_count),
                                                     attention_strategy(strategy), self.weights,
                                                     split_heads(self.context, self.heads_count))
        if R_q is None:  # CP: the values' third of the projection alone
            C = self.windows.shape[-1]
            weight, bias = self.qkv_op.weight[2 * C:], None if self.qkv_op.bias is None else self.qkv_op.bias[2 * C:]
            y = self.qkv if self.values_only else None if self.qkv is None else self.qkv[..., 2 * C:]
            R_windows = _from_output(rule, LinearOp(weight, bias), self.windows, merge_heads(R_v), y)
            return vjp(self.partition, x, R_windows)
        R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(*self.windows.shape[:2], -1)
        R_windows = _from_output(rule, _fresh(self.qkv_op), self.windows, R_qkv, self.qkv)
        return vjp(self.partition, x, R_windows)
