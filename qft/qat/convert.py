"""``convert``: fake-quant layers -> packed integer ``GPTQLinear`` (the irreversible half of QAT).

The codes, scales and zeros are computed by the layer's ``export_params``, i.e. with the same
operations as its fake-quant forward, so the converted model computes the same weights bit for bit
(``GPTQLinear`` dequantizes ``scale * (q - zero)`` in fp32 exactly as the fake-quant does).
"""
from __future__ import annotations

import torch
from torch import nn

from qft.quant import GPTQLinear

from .observer import ActivationFakeQuant
from .prepare import CONVERTED_FLAG, fake_quant_modules


class ActQuantGPTQLinear(nn.Module):
    """A converted layer that also quantizes its input (QAT with ``activation=``): ``linear(input_quant(x))``.

    The activation quantizer is frozen (observer off); weight-only GPTQ exporters see ``.linear``.
    """

    def __init__(self, input_quant: ActivationFakeQuant, linear: GPTQLinear):
        super().__init__()
        self.input_quant, self.linear = input_quant, linear
        setattr(self, CONVERTED_FLAG, True)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear(self.input_quant(x))


@torch.no_grad()
def convert_layer(layer) -> nn.Module:
    qw = layer.quantized_weight()
    q = GPTQLinear.from_codes(qw.codes, qw.scale, qw.zero, qw.g_idx, qw.bits, layer.group, bias=layer.layer_bias(),
                              sym=layer.weight_scheme.symmetric)
    setattr(q, CONVERTED_FLAG, True)
    if layer.input_quant is None:
        return q
    aq = layer.input_quant
    if aq.observed:
        aq.observing.fill_(False)
    return ActQuantGPTQLinear(aq, q)


def convert(model: nn.Module, keep_activation_quant: bool = True) -> list:
    """Replace every fake-quant layer in ``model`` (in place) by a packed ``GPTQLinear``; returns the names.

    With ``keep_activation_quant`` (default) layers trained with activation fake-quant keep it in
    front of the integer linear (``ActQuantGPTQLinear``), so the converted forward equals the
    fake-quant forward; pass False for a weight-only model (what GPTQ checkpoints hold).
    """
    layers = fake_quant_modules(model)
    if not layers:
        raise ValueError("qft.qat.convert: the model has no fake-quant layers. Prepare it first "
                         "(QATCallback or qft.qat.prepare), or it was already converted.")
    names = []
    for name, layer in layers:
        new = convert_layer(layer)
        if not keep_activation_quant and isinstance(new, ActQuantGPTQLinear):
            new = new.linear
        new.train(layer.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        names.append(name)
    setattr(model, CONVERTED_FLAG, True)
    return names
