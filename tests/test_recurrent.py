"""nn.LSTM (core/ops/recurrent.py), LRP for LSTMs after Arras et al. (WASSA 2017).

Independent reference: the LSTM written out by hand from its equations, with the gates i, f, o and
the ratios tanh(z)/z detached. That network is linear in its input along every path relevance
takes, so gradient × input of it is LRP-0 of the rule (gates constant, identity through tanh,
z-rule with the biases taking their share; Ancona et al., ICLR 2018). Then conservation with the
defaults (the biases' share kept with the inputs), and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relprop import LRP
from relprop.core.ops.recurrent import LSTMRule
from relprop.errors import UnsupportedLayerError

from references import explained_logit_seed, gradient_times_input, lrp0


def _held(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _tanh_as_gate(z: torch.Tensor) -> torch.Tensor:
    """tanh(z) = z · (tanh(z)/z), the ratio detached: the identity rule's linearization."""
    ratio = torch.where(z.abs() > 1e-12, z.tanh() / torch.where(z.abs() > 1e-12, z, torch.ones_like(z)),
                        torch.ones_like(z))
    return z * ratio.detach()


def held_lstm(lstm: nn.LSTM, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The LSTM's equations (PyTorch's gate order i, f, g, o), gates and tanh ratios detached:
    (output, (h_n, c_n)) as nn.LSTM returns them."""
    seq = x.transpose(0, 1) if lstm.batch_first else x
    H, directions = lstm.hidden_size, 2 if lstm.bidirectional else 1
    finals_h, finals_c = [], []
    for layer in range(lstm.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(lstm, "weight_ih" + suffix), getattr(lstm, "weight_hh" + suffix)
            b = getattr(lstm, "bias_ih" + suffix) + getattr(lstm, "bias_hh" + suffix)
            h = c = seq.new_zeros(seq.shape[1], H)
            out = [None] * seq.shape[0]
            for t in (reversed(range(seq.shape[0])) if d else range(seq.shape[0])):
                i, f, g, o = (seq[t] @ w_ih.T + h @ w_hh.T + b).chunk(4, -1)
                c = _held(f.sigmoid()) * c + _held(i.sigmoid()) * _tanh_as_gate(g)
                h = _held(o.sigmoid()) * _tanh_as_gate(c)
                out[t] = h
            outputs.append(torch.stack(out))
            finals_h.append(h)
            finals_c.append(c)
        seq = torch.cat(outputs, -1)
    out = seq.transpose(0, 1) if lstm.batch_first else seq
    return out, (torch.stack(finals_h), torch.stack(finals_c))


class Sequence(nn.Module):
    """Tokens -> LSTM -> a head over the mean of the outputs, or over the last layer's final
    hidden states (h_n) and cell state; `held` runs the hand-written reference instead."""

    def __init__(self, batch_first: bool = True, bidirectional: bool = False, num_layers: int = 1,
                 read: str = "mean") -> None:
        super().__init__()
        self.batch_first, self.read, self.held = batch_first, read, False
        self.embed = nn.Linear(5, 6)
        self.lstm = nn.LSTM(6, 4, num_layers, batch_first=batch_first, bidirectional=bidirectional)
        directions = 2 if bidirectional else 1
        self.head = nn.Linear(4 * directions if read == "mean" else 4 * 2, 3)

    def forward(self, x):  # x: (N, L, 5)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, (h_n, c_n) = held_lstm(self.lstm, h) if self.held else self.lstm(h)
        if self.read == "mean":
            return self.head(out.mean(1 if self.batch_first else 0))
        return self.head(torch.cat([h_n[-1], c_n[-1]], -1))


def _model(**options) -> Sequence:
    torch.manual_seed(0)
    model = Sequence(**options).eval()
    with torch.no_grad():
        for name, p in model.lstm.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return model


CASES = [dict(batch_first=True), dict(batch_first=False), dict(bidirectional=True), dict(num_layers=2),
         dict(num_layers=2, bidirectional=True, batch_first=False), dict(read="final states"),
         dict(read="final states", bidirectional=True, num_layers=2)]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_lrp0_equals_gradient_times_input_of_the_lstm_with_its_gates_held(options):
    model = _model(**options)
    x = torch.randn(3, 7, 5)
    R = lrp0(model, x, rules={nn.LSTM: LSTMRule(epsilon=0.0, biases="absorb")})
    model.held = True
    torch.testing.assert_close(model(x), _model(**options)(x), rtol=1e-5, atol=1e-6)  # the same function
    expected = gradient_times_input(model, x)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_lstm_conserves_with_the_biases_share_kept_on_the_inputs(options):
    """Seeded with the explained logit (a sequence-first LSTM's cut is not batch-major, so the
    seed itself is the reference total)."""
    model = _model(**options)
    x = torch.randn(3, 7, 5)
    with torch.no_grad():
        seed = explained_logit_seed(model(x))
    R = LRP(model).attribute(x, target=seed)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.flatten(1).sum(1), seed.sum(1), rtol=1e-4, atol=1e-6)


def test_with_constants_leak_the_biases_absorb_their_share():
    model = _model(bidirectional=True)
    x = torch.randn(3, 7, 5)
    _, kept = LRP(model).attribute(x, return_layer_sums=True)
    _, leaked = LRP(model, constants="leak").attribute(x, return_layer_sums=True)
    assert bool(((leaked["lstm"] - kept["lstm"]).abs() > 1e-3 * kept["lstm"].abs()).all())


class WithState(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(5, 4, batch_first=True, **options), nn.Linear(4, 2)
        self.register_buffer("h0", torch.zeros(1, 1, 4))

    def forward(self, x):
        state = (self.h0.expand(1, x.shape[0], 4).contiguous(),) * 2
        return self.head(self.lstm(x, state)[0].mean(1))


def test_an_lstm_called_with_hx_none_starts_from_zeros_and_is_explained():
    class NoneState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(5, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x, None)[0].mean(1))

    torch.manual_seed(0)
    model = NoneState().eval()
    x = torch.randn(2, 3, 5)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    torch.testing.assert_close(R.flatten(1).sum(1), sums["output"], rtol=1e-4, atol=1e-6)


class Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(5, 4, batch_first=True, proj_size=2), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


@pytest.mark.parametrize("model, message", [
    (WithState(), r"module 'lstm' \(LSTM\) is given an initial state"),
    (Projected(), r"module 'lstm' \(LSTM\) projects its hidden state \(proj_size=2\)"),
])
def test_what_the_rule_does_not_cover_is_refused_in_one_line(model, message):
    with pytest.raises(UnsupportedLayerError, match=message) as error:
        LRP(model.eval()).attribute(torch.randn(2, 3, 5))
    assert "\n" not in str(error.value)
