"""TF-'same' networks (timm's pnasnet5large, nasnet): max pools that read signed BatchNorm outputs
through a −inf pad, and convs that read an explicit zero pad deep in the network."""

import torch
import torch.nn.functional as F
from torch import nn

from relprop import LRP


class SamePool(nn.Module):
    """timm's MaxPool2dSame: a −inf pad, then a max pool (one 3×3 window per channel here)."""

    def forward(self, x):
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 3).flatten(1)


def test_the_average_max_pool_stand_in_gives_a_signed_window_to_its_maximum():
    """maxpool="avg" shares a window's relevance in proportion to its values; with a negative
    value the window's sum (0.7) is far below its max (1), and the shares (1/0.7, −1/0.7, ...)
    grow without bound as the sum nears 0. Such a window goes to its maximum, by hand."""
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.2]], [[1.0, 0.0], [0.5, 0.5]]]])
    R = LRP(SamePool()).attribute(x, target=torch.ones(1, 2))
    expected = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [0.25, 0.25]]]])
    torch.testing.assert_close(R, expected)


class SignedPools(nn.Module):
    """pnasnet's cells in small: max pools of BatchNorm outputs (no ReLU between), summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        for _ in range(4):
            h = h + F.max_pool2d(F.pad(h, (1, 1, 1, 1), value=float("-inf")), 3, 1)
        return self.head(torch.relu(h).mean((2, 3)))


def test_max_pools_of_signed_values_keep_relevance_positive_and_conserved():
    """The defaults (z+, W⁺ at the input, positive seed) give no negative share anywhere; the
    proportional shares of signed windows did, and compounded over the pools (|R| 2.6 to 4.5
    times the total here, 40 times per pool on pnasnet): a total that sums up, of cancellations."""
    torch.manual_seed(0)
    model = SignedPools()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    R, sums = LRP(model).attribute(x, return_layer_sums=True)
    torch.testing.assert_close(R.flatten(1).sum(1), sums["output"], rtol=1e-4, atol=1e-6)
    assert float(R.min()) >= 0.0


class ReluPadConv(nn.Module):
    """A hidden 3×3 conv padded by its own padding, by `F.pad` (timm's Conv2dSame) or `nn.ZeroPad2d`."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(1, 2, 1)
        self.conv = nn.Conv2d(2, 3, 3, padding=1 if how == "conv" else 0)
        self.pad, self.head = nn.ZeroPad2d(1), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.how == "function":
            h = F.pad(h, (1, 1, 1, 1))
        elif self.how == "module":
            h = self.pad(h)
        return self.head(torch.relu(self.conv(h)).mean((2, 3)))


def test_a_hidden_conv_reads_an_explicit_zero_pad_as_its_own_padding():
    """Where a window holds only zeros (after the ReLU), z+ sends its relevance by w⁺; through
    an explicit pad, the padded zeros took a share and the pad dropped it (2 % on pnasnet)."""
    torch.manual_seed(0)
    reference = ReluPadConv("conv")
    with torch.no_grad():
        reference.stem.weight.fill_(1.0)
        reference.stem.bias.zero_()
        reference.conv.bias.uniform_(0.5, 1.0)  # zero windows' outputs are their biases: relevance reaches them
    reference.eval()
    x = torch.randn(2, 1, 8, 8)
    x[:, :, :4] = -1.0  # the top half is 0 after the ReLU
    expected, sums = LRP(reference).attribute(x, return_layer_sums=True)
    torch.testing.assert_close(expected.flatten(1).sum(1), sums["output"])
    for how in ("function", "module"):
        model = ReluPadConv(how)
        model.load_state_dict(reference.state_dict())
        torch.testing.assert_close(LRP(model.eval()).attribute(x), expected, rtol=1e-5, atol=1e-7)
