"""Helpers shared by the QAT tests (a uniquely named module; conftest.py only holds fixtures)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(pl.LightningModule):
    """Two hidden linears and an ``lm_head`` (ignored by default); regression loss on fixed data.

    Each epoch is exactly two batches in a fixed order, so a resumed fit sees the same batches.
    """

    def __init__(self, width: int = 64, lr: float = 1e-2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, 32))
        self.lm_head = nn.Linear(32, 32)
        self.lr = lr
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 32, generator=g) * 3
        self.y = torch.randn(8, 32, generator=g)

    def forward(self, x):
        return self.lm_head(self.body(x))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def _loader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, shuffle=False)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0, **kw)
