"""ProgressLines prints the step, loss, step time, tokens/s and ETA; the module logs tokens/s to the bar."""
import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from qft.progress import ProgressLines


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch["input_ids"].float().mean()) ** 2
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_progress_lines_report_tokens_per_second(tmp_path, capsys):
    items = [{"input_ids": torch.ones(8, dtype=torch.long), "attention_mask": torch.tensor([1] * 6 + [0] * 2)}
             for _ in range(8)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, callbacks=[ProgressLines(every=2)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(items, batch_size=2))
    lines = [text for text in capsys.readouterr().out.splitlines() if "step " in text]
    assert [text.split()[1] for text in lines] == ["2/4", "4/4"]
    for line in lines:
        assert re.search(r"loss \d+\.\d{3}  \d+\.\d\d s/step  \d+ tokens/s  eta \d+ s", line), line
