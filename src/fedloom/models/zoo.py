"""The model zoo: the small networks federated-learning papers benchmark with, written out layer by layer.

Each model follows its published definition so results can be compared with the papers:
`mlp` and `cnn` are the 2NN and CNN of McMahan et al. 2017 (FedAvg), `simple-cnn` is NIID-Bench's
SimpleCNN (Li et al. 2022), `resnet-gn` is a CIFAR ResNet-20 with GroupNorm instead of BatchNorm
(Hsieh et al. 2020: BatchNorm's running statistics break under non-IID clients; GroupNorm keeps none).

Weights use PyTorch's default initialisation; the caller seeds torch before `build_model`, so the same
seed gives the same initial model. No model has dropout or other train-time randomness.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError


class LogReg(nn.Module):
    """Multinomial logistic regression: the convex baseline of FedProx and q-FFL experiments."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """FedAvg's 2NN: two hidden layers of 200 units (199,210 parameters on MNIST)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SimpleCNN(nn.Module):
    """NIID-Bench's SimpleCNN (LeNet-5 shaped): two 5x5 convolutions, then 120 -> 84 -> classes."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, batch_norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2  # 4x4 for 28x28, 5x5 for 32x32
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        # FedBN's variant: BatchNorm after every layer but the last (Li et al. 2021)
        norms = [nn.BatchNorm2d(6), nn.BatchNorm2d(16), nn.BatchNorm1d(120), nn.BatchNorm1d(84)] if batch_norm \
            else [nn.Identity() for _ in range(4)]
        self.bn1, self.bn2, self.bn3, self.bn4 = norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        x = F.relu(self.bn4(self.fc2(x)))
        return self.fc3(x)


class CNN(nn.Module):
    """FedAvg's CNN: two 5x5 'same' convolutions (32, 64 channels), each max-pooled, then 512 units."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BasicBlockGN(nn.Module):
    """ResNet basic block (two 3x3 convolutions) with GroupNorm and a 1x1 projection when shapes change."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:  # option B of He et al. 2016
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.GroupNorm(groups, channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """CIFAR ResNet (depth 6n+2; 20 by default): three stages of n blocks with 16/32/64 channels."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, groups: int = 2):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"resnet-gn depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, 16)
        blocks: list[nn.Module] = []
        in_ch = 16
        for stage, channels in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlockGN(in_ch, channels, stride, groups))
                in_ch = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class ModelEntry:
    """How to build one zoo model, and the smallest image it accepts (None: any shape, flattened)."""

    build: Callable[[tuple[int, ...], int], nn.Module]
    min_image_size: int | None = None
    registered: bool = False  # added with register_model: built defensively and checked on the data


MODELS: dict[str, ModelEntry] = {
    "logreg": ModelEntry(lambda s, k: LogReg(math.prod(s), k)),
    "mlp": ModelEntry(lambda s, k: MLP(math.prod(s), k)),
    "simple-cnn": ModelEntry(lambda s, k: SimpleCNN(*s, k), min_image_size=14),
    "simple-cnn-bn": ModelEntry(lambda s, k: SimpleCNN(*s, k, batch_norm=True), min_image_size=14),
    "cnn": ModelEntry(lambda s, k: CNN(*s, k), min_image_size=4),
    "resnet-gn": ModelEntry(lambda s, k: ResNetGN(s[0], k), min_image_size=1),
}


BUILTIN_MODELS = tuple(MODELS)  # names register_model may not take


def register_model(name: str, builder: Callable[[tuple[int, ...], int], nn.Module]) -> None:
    """Make `model.name = name` build `builder(input_shape, num_classes)`: an nn.Module giving logits.

    `input_shape` is one sample's shape (e.g. (1, 28, 28) or (30,)). The run seeds torch before calling it,
    so the same seed gives the same initial model. Train-time randomness (dropout) draws from torch's global
    generator, which fedloom does not seed per client: such a model trains, but not reproducibly. Registering
    a name again replaces it; built-in names cannot be taken. Registrations live in this process: register
    again (or load the plug-in module) before resuming a run in a new process.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"a model name must be a non-empty string without surrounding spaces, not {name!r}")
    if name in BUILTIN_MODELS:
        raise ConfigError(f"'{name}' is a built-in model name", "register yours under another name")
    if not callable(builder):
        raise ConfigError(f"register_model('{name}', ...) needs a builder function (input_shape, num_classes) -> "
                          f"nn.Module, not {type(builder).__name__}")
    MODELS[name] = ModelEntry(builder, registered=True)


def unknown_model(name: str) -> tuple[str, str]:
    """(message, hint) for a name neither built in nor registered: every name, the closest first."""
    ranked = difflib.get_close_matches(name.lower(), MODELS, n=len(MODELS), cutoff=0.0)
    close = difflib.get_close_matches(name.lower(), MODELS, n=1) or difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else \
        "set model.name to one of them, or register yours with fedloom.register_model (again in every new process)"
    return f"unknown model '{name}'; valid models: {', '.join(ranked)}", hint


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The zoo (or registered) model `name` for one example of `input_shape` and `num_classes` outputs (logits)."""
    entry = MODELS.get(name)
    if entry is None:
        raise ConfigError(*unknown_model(name))
    shape = tuple(int(d) for d in input_shape)
    if entry.min_image_size is not None:
        if len(shape) != 3:
            raise ConfigError(f"model '{name}' needs image input (C,H,W); dataset gives shape {shape}",
                              hint="use model = 'mlp' or 'logreg'")
        if min(shape[1:]) < entry.min_image_size:
            raise ConfigError(
                f"model '{name}' needs images of at least {entry.min_image_size}x{entry.min_image_size}; "
                f"dataset gives shape {shape}", hint="use model = 'resnet-gn', 'mlp' or 'logreg'")
    if not entry.registered:
        return entry.build(shape, num_classes)
    try:
        model = entry.build(shape, num_classes)
    except ConfigError:
        raise
    except Exception as e:  # the user's builder: say which, keep the traceback for --debug
        raise ConfigError(f"model '{name}' could not be built for input shape {shape} and {num_classes} classes: "
                          f"{type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the builder of model '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model(name: str, model: nn.Module, sample: torch.Tensor, num_classes: int) -> None:
    """Refuse, in one line before round 1, a model that cannot take the data: `sample` is a small batch of
    model input. Run in eval mode without gradients, so nothing about the model changes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:
        raise ConfigError(f"model '{name}' fails on the dataset's input (batch of shape {tuple(sample.shape)}): "
                          f"{type(e).__name__}: {e}", "make the model take samples of this shape") from e
    finally:
        model.train(was_training)
    want = (len(sample), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model '{name}' gives {got} for a batch of {len(sample)}; expected logits of shape {want}",
                          f"its last layer should have {num_classes} outputs (the dataset's classes)")
