"""Run the composed pipeline on a user's transformer in its own process; with --resume, from a checkpoint.

Writes the trained module's outputs on fixed inputs to OUT/outputs.pt, so that two processes compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .models import UserClassifier, loader
from .test_entry_points import CONFIGS, _outputs, _trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    network = "linear_transformer"
    module = UserClassifier(network)
    trainer = _trainer(CONFIGS["composed"].make(network, args.out), args.out)
    trainer.fit(module, loader(network), loader(network, batches=2, seed=1), ckpt_path=args.resume)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(_outputs(module, network), args.out / "outputs.pt")


if __name__ == "__main__":
    main()
