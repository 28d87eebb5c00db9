"""`nn.LSTM` (any `batch_first`, bidirectional, any number of layers): LRP for LSTMs after Arras et
al., "Explaining recurrent neural network predictions in sentiment analysis" (WASSA 2017).

Per layer and direction, at each step `c_t = f ⊙ c_{t-1} + i ⊙ g` and `h_t = o ⊙ tanh(c_t)`, with
`g = tanh(W_g x_t + U_g h_{t-1} + b_g)`:
- the gates i, f, o are held constant ("signal-take-all": a multiplicative gate gets no
  relevance, the signal it gates gets all of it);
- `tanh` passes relevance unchanged (the identity rule of an elementwise map);
- the cell sum splits `R(c_t)` between `f ⊙ c_{t-1}` and `i ⊙ g` in proportion to the two terms
  (ε-rule), so relevance flows back through time through the cell state;
- the linear map into g takes the ε-rule over its contributions `W_g x_t` and `U_g h_{t-1}`:
  part goes to the input at t, part to the previous hidden state, which carries it further back.
Relevance reaching the final states (h_n, c_n) enters the walk at the last step.

What the biases' share of `g`'s pre-activation does is the rule's choice (`LSTMRule(biases=...)`),
by default the composite's constants policy. `KeepOnInput` (the default): "spread", Arras et al.'s
`bias_factor = 1`, the share of the bias and ε goes equally to the step's input units (x_t's and
h_{t-1}'s; x_t's alone at the first step, where h_{t-1} is the zero initial state), so the layer
conserves exactly. (Keeping the denominator free of the bias instead, as the add rule does, divides
by sums near zero: single relevances up to 90x the total on random weights.) `LeakToConstants`:
"absorb", Arras et al.'s recommended `bias_factor = 0`, the biases and ε take their share, which
is lost. With "absorb" and ε = 0 the rule equals gradient × input of the LSTM whose gates and tanh
ratios `tanh(z)/z` are detached (tests/test_recurrent.py). The cell sum is split exactly (the
cell's share is what the old state does not take). The initial state is zero (an LSTM called with
`hx` is refused), so it holds nothing. Dropout between layers acts in training only; relprop
explains the model in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from relprop.core.constants import LeakToConstants
from relprop.core.numerics import stabilize
from relprop.core.ops.base import Context, Op, Parents
from relprop.core.rules import Rule
from relprop.errors import ConfigError, UnsupportedLayerError

BIAS_MODES = ("spread", "absorb")


class LSTMRule(Rule):
    """Arras et al. 2017 for `nn.LSTM`: gates constant, ε-rule on the linear maps and the cell sum.
    `biases="spread"`: the bias's and ε's share goes equally to the step's inputs (conserves);
    "absorb": they keep it (lost); None: "spread" under the composite's `KeepOnInput`, "absorb"
    under `LeakToConstants`."""

    name = "lstm"

    def __init__(self, epsilon: float = 1e-6, biases: str | None = None) -> None:
        if biases not in (None, *BIAS_MODES):
            raise ConfigError(f"LSTMRule(biases={biases!r}): choose one of {', '.join(BIAS_MODES)}")
        self.epsilon, self.biases = epsilon, biases

    def relevance(self, layer: nn.Module, a: Tensor, R: Tensor | list[Any]) -> Tensor:
        if not isinstance(layer, nn.LSTM):
            raise UnsupportedLayerError(f"the lstm rule takes nn.LSTM, not {type(layer).__name__}")
        return lstm_relevance(layer, a, R, self.epsilon, self.biases or "spread")

    def __repr__(self) -> str:
        return f"LSTMRule(epsilon={self.epsilon}, biases={self.biases!r})"


class Recurrent(Op):
    name = "recurrent"
    modules = (nn.LSTM,)

    def check_module(self, node: fx.Node, module: nn.Module) -> None:
        where = f"module '{node.target}' (LSTM)"
        if module.proj_size:
            raise UnsupportedLayerError(
                f"{where} projects its hidden state (proj_size={module.proj_size}), which relprop's LSTM rule does "
                "not cover; give it a rule (rules={torch.nn.LSTM: rule}) or use proj_size=0")
        if any(arg is not None for arg in (*node.args[1:], *node.kwargs.values())):
            raise UnsupportedLayerError(
                f"{where} is given an initial state (hx); relprop's LSTM rule starts from zeros: call it without hx "
                "or give it a rule (rules={torch.nn.LSTM: rule})")

    def default_rule(self, step, strategies) -> Rule:
        return LSTMRule(biases=_bias_mode(strategies))

    def forward(self, step, args: tuple, kwargs: dict, model: nn.Module) -> Any:
        if not isinstance(args[0], Tensor):
            raise UnsupportedLayerError(f"module '{step.node.target}' (LSTM) takes a {type(args[0]).__name__}; "
                                        "relprop explains LSTMs on padded tensors, not packed sequences")
        return step.module(*args, **kwargs)

    def relevance(self, step, values, R, context: Context) -> Parents:
        parent = step.inputs[0]
        rule = context.rule_for(step)
        if isinstance(rule, LSTMRule) and rule.biases is None:
            rule = LSTMRule(rule.epsilon, _bias_mode(context.strategies))
        return [(parent, rule.relevance(step.module, values[parent], R))]


def _bias_mode(strategies) -> str:
    return "absorb" if isinstance(strategies.constants, LeakToConstants) else "spread"


def lstm_relevance(lstm: nn.LSTM, a: Tensor, R: Tensor | list[Any], epsilon: float, biases: str) -> Tensor:
    """The input's relevance, given the relevance of the LSTM's output `(out, (h_n, c_n))`: a list
    of its slots (None where nothing reached one) or the output sequence's alone."""
    R_out, R_h_n, R_c_n = _slots(R)
    unbatched = a.dim() == 2
    x = a.unsqueeze(1) if unbatched else (a.transpose(0, 1) if lstm.batch_first else a)  # (L, N, D)
    x = x.float()
    if R_out is not None:
        R_out = R_out.unsqueeze(1) if unbatched else (R_out.transpose(0, 1) if lstm.batch_first else R_out)
    L, N, _ = x.shape
    H, directions = lstm.hidden_size, 2 if lstm.bidirectional else 1
    R_h_n, R_c_n = (None if r is None else (r.unsqueeze(1) if unbatched else r) for r in (R_h_n, R_c_n))
    inputs = [x]  # each layer's input sequence (L, N, D)
    runs: dict[tuple[int, int], list[dict[str, Tensor]]] = {}  # each layer-direction run once, its steps kept
    for layer in range(lstm.num_layers):
        outputs = []
        for d in range(directions):
            output, runs[layer, d] = _run(lstm, layer, d, inputs[-1])
            outputs.append(output)
        if layer < lstm.num_layers - 1:
            inputs.append(torch.cat(outputs, -1))
    R_seq = R_out.float() if R_out is not None else x.new_zeros(L, N, directions * H)
    for layer in reversed(range(lstm.num_layers)):
        R_in = torch.zeros_like(inputs[layer])
        for d in range(directions):
            k = layer * directions + d
            carry_h = R_h_n[k].float() if R_h_n is not None else None
            carry_c = R_c_n[k].float() if R_c_n is not None else None
            R_in = R_in + _direction(lstm, layer, d, inputs[layer], runs[layer, d], R_seq[..., d * H:(d + 1) * H],
                                     carry_h, carry_c, epsilon, biases)
        R_seq = R_in
    R_x = R_seq
    return R_x.squeeze(1) if unbatched else (R_x.transpose(0, 1) if lstm.batch_first else R_x)


def _slots(R: Tensor | list[Any]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if isinstance(R, Tensor):
        return R, None, None
    out, states = R[0], R[1] if len(R) > 1 else None
    if isinstance(states, (list, tuple)):
        return out, states[0], states[1]
    return out, None, None


def _weights(lstm: nn.LSTM, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh = getattr(lstm, "weight_ih" + suffix).float(), getattr(lstm, "weight_hh" + suffix).float()
    bias = torch.zeros(w_ih.shape[0], dtype=w_ih.dtype, device=w_ih.device)
    if lstm.bias:
        bias = getattr(lstm, "bias_ih" + suffix).float() + getattr(lstm, "bias_hh" + suffix).float()
    return w_ih, w_hh, bias


def _run(lstm: nn.LSTM, layer: int, direction: int, x: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """One layer and direction from a zero state: its outputs (L, N, H) in sequence order and, per
    step in processing order, what the relevance walk needs."""
    w_ih, w_hh, bias = _weights(lstm, layer, direction)
    L, N, _ = x.shape
    H = lstm.hidden_size
    h, c = x.new_zeros(N, H), x.new_zeros(N, H)
    outputs: list[Tensor | None] = [None] * L
    steps = []
    for t in (reversed(range(L)) if direction else range(L)):
        from_x, from_h = x[t] @ w_ih.T, h @ w_hh.T
        i, f, g, o = (from_x + from_h + bias).chunk(4, -1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        steps.append({"t": t, "h": h, "c": c, "i": i, "f": f, "g": g, "c_new": c_new,
                      "z_x": from_x.chunk(4, -1)[2], "z_h": from_h.chunk(4, -1)[2], "b": bias.chunk(4)[2]})
        h, c = o * c_new.tanh(), c_new
        outputs[t] = h
    return torch.stack(outputs), steps


def _direction(lstm: nn.LSTM, layer: int, direction: int, x: Tensor, steps: list[dict[str, Tensor]], R_h: Tensor,
               carry_h: Tensor | None, carry_c: Tensor | None, epsilon: float, biases: str) -> Tensor:
    """The relevance of one layer-direction's input sequence, given its outputs' relevance and
    its forward run's steps (`_run`)."""
    w_ih, w_hh, _ = _weights(lstm, layer, direction)
    H = lstm.hidden_size
    w_x, w_h = w_ih[2 * H:3 * H], w_hh[2 * H:3 * H]  # the rows of the cell candidate g
    R_x = torch.zeros_like(x)
    R_carry_h = carry_h if carry_h is not None else torch.zeros_like(R_h[0])
    R_carry_c = carry_c if carry_c is not None else torch.zeros_like(R_h[0])
    first = steps[0]["t"]
    for s in reversed(steps):
        R_c = R_carry_c + R_carry_h + R_h[s["t"]]  # h = o ⊙ tanh(c): the gate o takes none, tanh passes
        R_carry_c = s["f"] * s["c"] * (R_c / stabilize(s["c_new"], epsilon))  # the gates f, i take none
        R_g = R_c - R_carry_c  # the candidate i ⊙ g: the rest, so the cell sum conserves exactly
        z = stabilize(s["z_x"] + s["z_h"] + s["b"], epsilon)
        share = R_g / z  # tanh passes R_g to g's pre-activation
        R_x[s["t"]] = x[s["t"]] * (share @ w_x)
        R_carry_h = s["h"] * (share @ w_h)
        if biases == "spread":  # the bias's and ε's share, equally to the step's input units
            units = w_x.shape[1] + (0 if s["t"] == first else H)
            spread = (share * (z - s["z_x"] - s["z_h"])).sum(-1, keepdim=True) / units
            R_x[s["t"]] += spread
            if s["t"] != first:
                R_carry_h = R_carry_h + spread
    return R_x
