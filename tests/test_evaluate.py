"""qft.evaluate: the teacher-forced answer accuracy counts what greedy decoding would get right."""
from types import SimpleNamespace

import torch
from torch import nn

from qft.evaluate import answer_accuracy


class Oracle(nn.Module):
    """Puts all mass on the next token of its own input (shifted by ``lag``): ``lag=1`` is always right,
    ``lag=0`` (repeat the current token) wrong wherever the next token differs from the current one."""

    def __init__(self, vocab: int, lag: int = 1):
        super().__init__()
        self.vocab, self.lag = vocab, lag
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        target = torch.roll(input_ids, -self.lag, dims=1) if self.lag else input_ids
        return SimpleNamespace(logits=nn.functional.one_hot(target, self.vocab).float() * 20.0)


def test_answer_accuracy_is_one_for_the_oracle_and_zero_for_a_copier(tokenizer):
    vocab = len(tokenizer)
    right = answer_accuracy(Oracle(vocab), tokenizer, num_val=40, batch_size=16)
    assert right["acc"] == 1.0 and right["n"] == 40 and right["nll"] < 1e-3
    wrong = answer_accuracy(Oracle(vocab, lag=0), tokenizer, num_val=40, batch_size=16)
    assert wrong["acc"] == 0.0 and wrong["nll"] > 1.0


def test_answer_accuracy_drops_excluded_problems(tokenizer):
    from qft.data.synthetic import _pairs

    held = _pairs(10, 1_000_003)  # the held-out pairs of seed 0, in order
    out = answer_accuracy(Oracle(len(tokenizer)), tokenizer, num_val=10, exclude=held[:3])
    assert out["n"] == 7
