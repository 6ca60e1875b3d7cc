"""The ``lightning-compress`` command: a LightningCLI over ImageClassifier and any data module, and two
tools for the files it writes.

Example:
    lightning-compress fit --config recipes/quickstart.yaml
    lightning-compress test --config recipes/vgg19_cifar10/baseline.yaml --ckpt_path checkpoints/vgg19_bn_cifar10/best.ckpt
    lightning-compress inspect checkpoints/quickstart/lightning_logs/version_0/model.lcpk
    lightning-compress evaluate model.int8.onnx --config recipes/digits/qat_int8.yaml

A value a callback, the model or the data module refuses (``sparsity: 1.5``) is one line on stderr
naming where it is, the value and the rule, and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


_PACKAGE = str(Path(__file__).resolve().parent)


def refusal_message(error: BaseException) -> str | None:
    """``"<where> (<class>): <message>"`` for a ValueError that the ``__init__`` of a class of this package
    raised while the recipe was instantiated (jsonargparse wraps it in its own errors); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cls = _raising_class(error) if isinstance(error, ValueError) else None
        if cls is not None:
            where = "model" if cls == "ImageClassifier" else "data" if "DataModule" in cls else "trainer.callbacks"
            return f"{where} ({cls}): {error}"
        error = error.__cause__ or error.__context__
    return None


def _raising_class(error: BaseException) -> str | None:
    """The class of this package whose ``__init__`` raised ``error`` (the innermost one), if any."""
    tb = error.__traceback__
    name = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and frame.f_code.co_filename.startswith(_PACKAGE) and "self" in frame.f_locals:
            name = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return name


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("inspect", "evaluate"):
        from .tools import main as tools_main

        sys.exit(tools_main(words))
    try:
        build_cli(argv)  # None: LightningCLI reads sys.argv itself
    except ValueError as error:
        message = refusal_message(error)
        if message is None:
            raise
        print(f"lightning-compress: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
