"""Networks and a LightningModule as users write them: no ImageClassifier, no ``.model`` attribute.

Everything is tiny (a few batches, narrow layers) so that every entry point of every callback on
every network fits in CI; what is exercised is the code path, not the accuracy.
"""

from __future__ import annotations

from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import restore_structure_on_load

NUM_CLASSES = 4


class SmallCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_CLASSES),
        )


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


class Conv1dNet(nn.Module):
    """A 1-D signal classifier (audio, sensors): Conv1d, BatchNorm1d, pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


class Block(nn.Module):
    """Pre-norm self-attention block written with Linear layers (q, k, v, out projections)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(attention)
        return x + self.mlp(self.norm2(x))


class LinearTransformer(nn.Module):
    """A transformer classifier on token inputs (batch, tokens, features), every projection a Linear."""

    def __init__(self, features: int = 12, dim: int = 32, depth: int = 2, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads=4) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class TorchTransformer(nn.Module):
    """The same task with ``nn.TransformerEncoderLayer``: its attention's in-projection is a Parameter."""

    def __init__(self, features: int = 12, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=NUM_CLASSES)


def _mobilenet_v3_small() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES, dropout=0.0)  # dropout: resumes compare exactly


# name -> (builder, one input's shape)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (_resnet18, (3, 16, 16)),
    "mobilenet_v3_small": (_mobilenet_v3_small, (3, 16, 16)),
    "small_cnn": (SmallCNN, (3, 8, 8)),
    "mlp": (MLP, (3, 4, 4)),
    "conv1d": (Conv1dNet, (2, 32)),
    "linear_transformer": (LinearTransformer, (6, 12)),
    "torch_transformer": (TorchTransformer, (6, 12)),
}


class UserClassifier(pl.LightningModule):
    """A LightningModule written by a user: the network is ``self.net``, the optimizer SGD with momentum.

    ``__init__`` holds the one line that lets every checkpoint of a compressed run load into it
    (the README's recipe for one's own module).
    """

    def __init__(self, network: str = "small_cnn", lr: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = NETWORKS[network][0]()
        restore_structure_on_load(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        # The deep torchvision nets diverge from random init at the small nets' rate on these few batches.
        lr = self.hparams.lr or (0.002 if self.hparams.network in ("resnet18", "mobilenet_v3_small") else 0.05)
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)


def loader(network: str, batches: int = 4, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random inputs with learnable labels (a fixed random linear map of the input), in a fixed order."""
    shape = NETWORKS[network][1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, *shape, generator=g)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), NUM_CLASSES, generator=torch.Generator().manual_seed(1))).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)
