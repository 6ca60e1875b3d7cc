"""Train digits_cnn with a compression callback; a script, so tests can use fresh processes and DDP.

    python -m tests.scripts.compress_digits OUT_DIR [--method prune|share|decompose|quantize|compose] [--epochs N] [--resume CKPT]
                                                    [--devices N] [--save-every-epoch] [--rehabilitation]
                                                    [--decompose-epoch N]

Writes OUT_DIR/rank<r>.pt with the state dict before fit-end finalization (masks, codebooks) and the
callback's state, for that rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import (
    DigitsDataModule,
    ImageClassifier,
    IterativePruning,
    QuantizationAwareTraining,
    TensorDecomposition,
    WeightSharing,
)


class SaveOutcome(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):  # before the callbacks finalize (on_fit_end)
        # Tensors only: fake-quant layers also hold their formats (plain values) as extra state.
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items() if torch.is_tensor(v)}
        kinds = (IterativePruning, WeightSharing, TensorDecomposition, QuantizationAwareTraining)
        methods = [c for c in trainer.callbacks if isinstance(c, kinds)]
        method = methods[0]
        if len(methods) > 1:  # composed: the decomposition plan and the pruning trajectory
            history = [[(d.name, d.method, d.ranks) for d in methods[0].plan], methods[1].history]
        elif isinstance(method, QuantizationAwareTraining):
            history = method.calibrated
        elif isinstance(method, IterativePruning):
            history = method.history
        elif isinstance(method, WeightSharing):
            history = method.clustered
        else:
            history = [(d.name, d.method, d.ranks) for d in method.plan]
        torch.save({"state": state, "history": history}, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--save-every-epoch", action="store_true")
    parser.add_argument("--rehabilitation", action="store_true")
    parser.add_argument("--method", choices=["prune", "share", "decompose", "quantize", "compose"], default="prune")
    parser.add_argument("--decompose-epoch", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(0)
    if args.method == "prune":
        method = IterativePruning(
            sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=3, frequency=3, scope="global",
            rehabilitation=args.rehabilitation, criterion="magnitude",
        )
    elif args.method == "share":
        method = WeightSharing(weight_bits=3, start_epoch=1)
    elif args.method == "compose":
        method = [
            TensorDecomposition(method="tucker", rank="energy:0.8", start_epoch=0, rank_multiple=4, print_table=False),
            IterativePruning(sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=3, frequency=3, scope="global"),
            QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=1),
        ]
    elif args.method == "quantize":
        method = QuantizationAwareTraining(weight_bits=4, activation_bits=8, freeze_observers_epoch=2)
    else:
        method = TensorDecomposition(method="tucker", rank="energy:0.8", start_epoch=args.decompose_epoch, rank_multiple=4)
    methods = [method] if not isinstance(method, list) else method
    callbacks = [*methods, SaveOutcome(args.out)]
    if args.save_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=args.out / "ckpt", filename="{epoch}", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_checkpointing=args.save_every_epoch,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
    )
    module = ImageClassifier("digits_cnn", optimizer="sgd", lr=0.05, weight_decay=5e-4)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
