"""Small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

import qat
from qat.modules import QuantizedLayer


class TinyCNN(nn.Module):
    """Conv+BN+ReLU, a depthwise conv, and two Linear layers: every core feature in 8×8 inputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyResNet(nn.Module):
    """A stem and two torchvision BasicBlocks (the second with a strided 1×1 downsample): residual
    additions whose operands come from a folded conv, the previous block and the downsample, and
    one ``nn.ReLU`` called twice per block, as in torchvision's ResNets."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                                                            nn.BatchNorm2d(16)))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


EVERYTHING_RECIPE = {
    "weight": {"bits": 4},
    "rules": [
        {"names": "fc1", "weight": {"granularity": "per_group", "group_size": 32, "observer": "mse"},
         "activation": {"learnable": True, "observer": "moving_average_minmax"}},
        {"names": "fc2", "weight": {"learnable": True, "symmetric": False},
         "activation": {"granularity": "per_token", "signed": True, "symmetric": True}},
    ],
}
"""A recipe that uses BN folding, per-channel, per-group + MSE, learnable (LSQ and LSQ+), and per-token."""


def assert_every_parameter_accounted_for(model: nn.Module) -> None:
    """Each parameter of a prepared model belongs to a quantized layer (a folded BatchNorm and
    the quantizers included) or to a layer that qat.summary lists as float ("" = the model)."""
    float_layers = qat.summary(model).float_layers
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        listed = owner in float_layers or any(owner.startswith(f"{f}.") for f in float_layers if f)
        inside_twin = any(owner == q or owner.startswith(f"{q}.") for q in quantized)
        assert listed or inside_twin, f"parameter {name} is neither quantized nor reported"
