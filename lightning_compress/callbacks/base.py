"""What the compression callbacks share: their layers by name, their place in a pipeline, a checkpoint
key per instance, and the hook that rebuilds a checkpoint's compressed structure before it loads."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from torch import nn
from typing_extensions import override

from ..methods.coverage import keep_regular_forward, uncovered_weights
from ..methods.structure import restore_structure, restores_on_load
from .targets import compressible_root, lookup


class CompressionCallback(Callback):
    """Base of the compression callbacks (not used on its own).

    Subclasses resolve their ``targets`` in ``setup`` into layer names (:meth:`_claim`) and look the
    layers up by name at each use (:attr:`layers`): a layer may be replaced after setup, when a
    checkpoint with factorized layers or removed channels loads.

    Several instances of one callback may share a Trainer (different layers, different settings):
    each has its own :attr:`state_key` in the checkpoint, and two instances may not claim one layer.
    """

    #: the pipeline's order of structural changes: decompose, prune, quantize, share
    order: ClassVar[int] = 0

    def __init__(self, targets: Iterable[str] | None = None) -> None:
        self.targets = list(targets) if targets is not None else None
        self._root: nn.Module | None = None
        self._names: list[str] = []
        self._announced = False

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The layers this callback compresses, by name, as the network holds them now."""
        return lookup(self._root, self._names)

    def _state_key_fields(self) -> dict[str, Any]:
        """The arguments that tell two instances of this callback apart in a checkpoint."""
        return {"targets": self.targets}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_fields())

    def _attach(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> nn.Module:
        """The start of ``setup``: check the pipeline, install the restore hook; returns the network."""
        from .composition import check_composition

        check_composition(trainer)
        if trainer is not None:
            _install_restore_hook(trainer, pl_module)
        return compressible_root(pl_module)

    def _claim(self, trainer: pl.Trainer | None, root: nn.Module, names: list[str],
               accept: Callable[[nn.Module], bool] | None = None) -> None:
        """Take ``names`` as this callback's layers; another instance of the same class may not have them.

        With ``accept`` (the technique's test of a layer) and default targets, say once which weights
        of the model stay as they are, and why.
        """
        if trainer is not None:
            for other in trainer.callbacks:
                if other is self or type(other) is not type(self) or other._root is not root:
                    continue
                shared = sorted(set(names) & set(other._names))
                if shared:
                    raise ValueError(
                        f"two {type(self).__name__} callbacks both target {shared[:6]}"
                        f"{' ...' if len(shared) > 6 else ''}; give each its own layers with disjoint `targets` "
                        f"(now {other.targets!r} and {self.targets!r})"
                    )
        self._root, self._names = root, names
        keep_regular_forward(root, names)
        if accept is not None and self.targets is None and not self._announced:
            left = uncovered_weights(root, names, accept)
            if left:
                shown = "; ".join(f"{name}: {why}" for name, why in list(left.items())[:6])
                rank_zero_info(f"{type(self).__name__}: {len(names)} layers targeted; {len(left)} weight tensors are left "
                               f"as they are ({shown}{'; ...' if len(left) > 6 else ''})")
            self._announced = True

    @property
    def summary(self) -> dict[str, Any]:
        """What this callback did, in plain values (the numbers it logs, JSON-ready)."""
        raise NotImplementedError

    def _load_fields(self, state_dict: dict[str, Any], fields: dict[str, Callable[[Any], Any]]) -> None:
        """Set each of ``fields`` (name -> conversion) from ``state_dict``; a name that a checkpoint of an
        older version lacks keeps its current value, with a warning naming it."""
        missing = [name for name in fields if name not in state_dict]
        if missing:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's state has no {missing}; they keep their current "
                           "values (a checkpoint of an older version)")
        for name, convert in fields.items():
            if name in state_dict:
                setattr(self, name, convert(state_dict[name]))

    def _before_change(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Right before this callback first changes what the model computes: a CompressionReport in
        the Trainer measures the model as it is (once a fit, whichever callback comes first)."""
        if trainer is None:
            return
        for callback in trainer.callbacks:
            measure = getattr(callback, "measure_before", None)
            if measure is not None:
                measure(trainer, pl_module)

    def _setup_done(self, pl_module: pl.LightningModule) -> None:
        """The end of ``setup``: the layers as they are now are the ones a checkpoint may replace."""
        hook = _HOOKS.get(pl_module)
        if hook is not None:
            hook.remember()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        hook = _HOOKS.pop(pl_module, None)
        if hook is not None:
            hook.handle.remove()


def artifact_path(trainer: pl.Trainer, path: str | None) -> Path | None:
    """Where a callback writes the file ``path``: as given when absolute, else under the Trainer's log
    directory (the logger's version folder, or ``default_root_dir`` without a logger), as ModelCheckpoint
    places its files by default. Call it on every process: the log directory is broadcast."""
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / path


@contextmanager
def working(message: str) -> Iterator[None]:
    """A spinner with ``message`` for a long step outside the training loop (an export, a file being
    packed), on a terminal only: in a log it would be a line of noise."""
    console = Console()
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def compression_callbacks(trainer: pl.Trainer | None) -> list[CompressionCallback]:
    return [c for c in trainer.callbacks if isinstance(c, CompressionCallback)] if trainer is not None else []


class _RestoreHook:
    """Before the LightningModule loads a state dict, give its network the state dict's structure.

    Lightning loads a checkpoint after the callbacks' ``setup`` and before their own state: so the
    structure must come from the state dict itself (:func:`restore_structure`). When that replaced
    layers (factorized ones, removed channels), the compression callbacks' layers are stale: their
    ``setup`` (idempotent) runs again, in order, so that masks, fake-quant and codebooks sit on the new
    layers before the values load.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = weakref.ref(trainer)
        self.module = weakref.ref(pl_module)
        self.known: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        this = weakref.ref(self)

        # A plain function as the registered hook: it deep-copies with the module by reference.
        def pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
            hook = this()
            if hook is not None:
                hook(state_dict, prefix)

        self.handle = pl_module.register_load_state_dict_pre_hook(pre_hook)

    def remember(self) -> None:
        pl_module = self.module()
        if pl_module is not None:
            self.known = weakref.WeakSet(compressible_root(pl_module).modules())

    def __call__(self, state_dict: dict, prefix: str) -> None:
        pl_module, trainer = self.module(), self.trainer()
        if pl_module is None:
            return
        root = compressible_root(pl_module)
        inner = next(name for name, module in pl_module.named_modules() if module is root)
        restore_structure(root, state_dict, prefix + (inner + "." if inner else ""))
        if trainer is not None and any(m not in self.known for m in root.modules()):
            for callback in compression_callbacks(trainer):
                callback.setup(trainer, pl_module, trainer.state.fn)
            # Masks and buffers now sit on the new layers; fill in what the state dict lacks for them.
            restore_structure(root, state_dict, prefix + (inner + "." if inner else ""))
            self.remember()


_HOOKS: weakref.WeakKeyDictionary[nn.Module, _RestoreHook] = weakref.WeakKeyDictionary()


def _install_restore_hook(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    hook = _HOOKS.get(pl_module)
    if hook is None:
        _HOOKS[pl_module] = _RestoreHook(trainer, pl_module)
        _warn_about_spawn(trainer, pl_module)
    else:
        hook.trainer = weakref.ref(trainer)


def _warn_about_spawn(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """ddp_spawn / ddp_notebook train in worker processes and copy the weights back into the main process's
    module non-strictly: a compressed state dict there loads only into a module that rebuilds its structure."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher) and not restores_on_load(pl_module):
        rank_zero_warn(
            f"{type(trainer.strategy).__name__} trains in worker processes and copies only the weights back into "
            f"the main process's {type(pl_module).__name__}, whose network is not compressed there: factorized and "
            "fake-quant layers would be lost silently. Add `restore_structure_on_load(self)` (from lightning_compress) "
            "to its __init__, or use strategy='ddp'."
        )
