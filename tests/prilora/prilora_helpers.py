"""Helpers shared by the PRILoRA tests: token batches, a hand-built layered net, a plain peft module."""


import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader


def token_loader(n_batches=8, batch=2, seq=16, seed=0, vocab=1000):
    """Deterministic random-token LM batches (labels = inputs), no shuffle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_batches * batch, seq), generator=g)
    items = [dict(input_ids=i, attention_mask=torch.ones_like(i), labels=i.clone()) for i in ids]
    return DataLoader(items, batch_size=batch, shuffle=False)


def trainer_kwargs(tmp_path, **kw):
    base = dict(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                enable_model_summary=False, logger=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kw)
    return base


class TinyNet(torch.nn.Module):
    """``model.layers[i].proj``: Llama-like naming so PRILoRA finds the decoder stack."""

    def __init__(self, width=8, layers=3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.proj = torch.nn.Linear(width, width)
            self.model.layers.append(block)

    def forward(self, x):
        for block in self.model.layers:
            x = torch.tanh(block.proj(x))
        return x


class PlainPeftModule(pl.LightningModule):
    """A plain LightningModule whose model is already peft-wrapped (a plain-peft user)."""

    def __init__(self, rank_pattern=None, alpha_pattern=None, r=8, width=8, layers=3, seed=0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=16, target_modules=["proj"], rank_pattern=rank_pattern or {},
                         alpha_pattern=alpha_pattern or {}, init_lora_weights="gaussian")
        self.model = get_peft_model(TinyNet(width, layers), cfg)
        self.width = width

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def vector_loader(n_batches=6, batch=4, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, width, generator=g)
    y = torch.randn(n_batches * batch, width, generator=g)
    return DataLoader(list(zip(x, y)), batch_size=batch, shuffle=False)


