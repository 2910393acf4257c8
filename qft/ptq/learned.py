"""What a QAT-trained model hands the W8A8 export: its learned weight grids and input ranges.

A model trained with ``QATCallback(weight=QuantScheme(bits=8, granularity="per_channel"),
activation=...)`` has already chosen every number a W8A8 checkpoint holds: the int8 codes and
per-channel scales of each weight (``qft.layers.grid``) and, for static activations, the range its
observer settled on (``qft.layers.input_grid``). Keeping them makes the exported model compute what
the fake-quant model computed in training; solving new ones (``qat_grid="resolve"``) would quantize
a model that never learned to live with them. Everything here is checked before any work starts.
"""
from __future__ import annotations

import torch

from qft import layers

from .config import W8A8Config
from .layer import ZERO

QAT_GRIDS = ("keep", "resolve")
_HINT = ("Train with QATCallback(weight=QuantScheme(bits=8, granularity='per_channel'), "
         "activation=QuantScheme(bits=8, granularity='per_token', dynamic=True) or QuantScheme(bits=8, "
         "granularity='per_tensor')), or export with qat_grid='resolve' (qft export --qat-grid resolve) to solve "
         "a new int8 grid from the merged weights.")


def check_qat_grid(qat_grid: str) -> str:
    if qat_grid not in QAT_GRIDS:
        raise ValueError(f"export_w8a8(qat_grid={qat_grid!r}) is unknown; allowed: {list(QAT_GRIDS)} ('keep': "
                         "write the int8 grid and input ranges QAT learned; 'resolve': ignore them and quantize the "
                         "merged weights anew).")
    return qat_grid


def learned_activation(trained) -> str | None:
    """``"dynamic"`` or ``"static"``: the activation mode the model's QAT layers trained, None if none did."""
    modes = {("per_token", True): "dynamic", ("per_tensor", False): "static"}  # what W8A8 can write
    found = {modes.get((g.scheme.granularity, g.scheme.dynamic)) for g in _input_grids(trained).values()}
    return found.pop() if len(found) == 1 else None


def _input_grids(trained) -> dict:
    return layers.input_grids(layers.unwrap(trained))


def learned_w8a8(trained, cfg: W8A8Config, qat_grid: str = "keep", before_training: bool = False
                 ) -> tuple[dict, dict]:
    """``({layer: QuantizedWeight}, {layer: input scale})`` to keep, by HF layer name; refuses, naming the
    layer, any learned grid that a W8A8 checkpoint cannot hold or that disagrees with ``cfg``.

    ``before_training``: the set-up check of a callback, when QAT's observers have seen nothing yet;
    their layers map to None (a range that training will supply) instead of being refused."""
    if check_qat_grid(qat_grid) == "resolve":
        return {}, {}
    model = layers.unwrap(trained)
    under = layers.grid_under_adapter(model)
    if under:
        raise ValueError(f"export_w8a8: {len(under)} layers (e.g. {under[0]}) hold a QAT grid under a LoRA adapter "
                         "that adds outside it (QATCallback(lora_merged=False)); the merged weight was never on a "
                         "trained grid. Train with lora_merged=True (the default), or qat_grid='resolve'.")
    weights, inputs = layers.grids(model), _input_grids(model)
    if (weights or inputs) and cfg.smoothquant is not None:
        raise ValueError(f"export_w8a8: SmoothQuant (smoothquant={cfg.smoothquant}) rescales the weights and inputs "
                         f"that QAT trained ({len(weights)} layers carry a learned grid), moving them off it. Drop "
                         "smoothquant to keep the learned grid, or set qat_grid='resolve'.")
    for name, qw in weights.items():
        if qw.bits != 8 or qw.scale.shape[1] != 1 or not torch.all(qw.zero == ZERO):
            kind = f"{qw.bits}-bit " + ("per-channel" if qw.scale.shape[1] == 1 else f"group-{qw.group_size}")
            kind += "" if torch.all(qw.zero == 2 ** (qw.bits - 1)) else " asymmetric"
            raise ValueError(f"export_w8a8: layer {name} was trained on a {kind} weight grid; a W8A8 checkpoint holds "
                             "int8 symmetric weights with one scale per output channel. Export this model as GPTQ "
                             f"(qft export --format gptq keeps its grid). {_HINT}")
    want = cfg.activation_scheme
    scales = {}
    for name, g in inputs.items():
        s = g.scheme
        if s.bits != 8 or not s.symmetric or s.granularity != want.granularity or s.dynamic != want.dynamic:
            raise ValueError(f"export_w8a8: layer {name} trained its inputs on QuantScheme(bits={s.bits}, "
                             f"granularity={s.granularity!r}, symmetric={s.symmetric}, dynamic={s.dynamic}), but "
                             f"activation={cfg.activation!r} writes QuantScheme(bits=8, granularity="
                             f"{want.granularity!r}, symmetric=True, dynamic={want.dynamic}). Export with the mode "
                             f"it trained, if it is one of those (here: {learned_activation(model)}). {_HINT}")
        if not g.static:
            continue
        if g.scale is None and not before_training:
            raise ValueError(f"export_w8a8: layer {name}'s activation observer has seen no training batch, so it "
                             "has no range to write (its fake-quant passes inputs through until it has). Train at "
                             "least one step after QATCallback(start_step=...), or export with qat_grid='resolve' to "
                             "calibrate the ranges instead.")
        scales[name] = None if g.scale is None else g.scale.detach().float().reshape(1)
    return weights, scales
