"""Your own model in fedloom: a small CNN on scikit-learn's 8x8 digits, registered by name.

    .venv/bin/python examples/custom_model.py [--rounds 10] [--no-report]

`fedloom.register_model(name, builder)` makes `model.name = name` build `builder(input_shape, num_classes)`
(any torch.nn.Module giving logits); importing this file registers it, so it also serves as a plug-in.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import fedloom


class DigitsCNN(nn.Module):
    """The digits set gives 64 features per sample: seen as one 8x8 image, two 3x3 convolutions, then a linear
    layer to the classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        side = math.isqrt(math.prod(input_shape))
        if side * side != math.prod(input_shape):
            raise ValueError(f"needs a square number of features, got shape {input_shape}")
        self.side = side
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * (side // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), 1, self.side, self.side)
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


fedloom.register_model("digits-cnn", DigitsCNN)

CONFIG = {
    "name": "digits-cnn",
    "data": {"dataset": "digits", "num_clients": 8, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "digits-cnn"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "run": {"rounds": 10, "seed": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=CONFIG["run"]["rounds"])
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    args = parser.parse_args()
    result = fedloom.run(CONFIG, rounds=args.rounds, make_report=not args.no_report)
    print(f"{result.run_id}: {result.status} after {result.summary['rounds_completed']} rounds, "
          f"test accuracy {result.summary['final_accuracy']:.3f}")


if __name__ == "__main__":
    main()
