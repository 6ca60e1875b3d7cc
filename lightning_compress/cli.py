"""The ``lightning-compress`` command: a LightningCLI over ImageClassifier and any data module.

Example:
    lightning-compress fit --config recipes/quickstart.yaml
    lightning-compress test --config recipes/vgg19_cifar10/baseline.yaml --ckpt_path checkpoints/vgg19_bn_cifar10/best.ckpt
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .module import ImageClassifier


class CompressCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is left out: ImageClassifier's batches are (image, label) pairs and there is no
        # prediction writer to go with it.
        return {key: value for key, value in LightningCLI.subcommands().items() if key in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> CompressCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand."""
    return CompressCLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()
