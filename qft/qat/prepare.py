"""Finding target layers and swapping them for fake-quant layers (the ``prepare`` half of QAT).

The swap walks ``model.named_modules()`` of whatever it is given (a LightningModule, an HF model, a
peft model), replaces each target in its parent with ``setattr`` and never touches a ``forward``.
Running it on an already prepared model is a no-op (fitting twice); running it on a converted model
is an error, because packed integer weights cannot be trained.
"""
from __future__ import annotations

from torch import nn

from qft import layers

from .config import QATConfig
from .layer import FakeQuantLinear, FakeQuantLoRALinear, _WeightFakeQuantMixin

CONVERTED_FLAG = "_qft_qat_converted"


def find_targets(model: nn.Module, config: QATConfig) -> dict:
    """``{name: (in_features, out_features)}`` of the layers ``prepare`` would swap (or has swapped).

    Candidates are ``qft.layers.linear_layers`` (plain, NF4, LoRA over either, already fake-quant), so
    an adapter's own ``lora_A``/``lora_B`` are never targets. A LoRA layer is one target (its merged
    weight) unless ``lora_merged=False``, which targets its ``base_layer`` alone.
    """
    found = {}
    for name, m in layers.linear_layers(model).items():
        kind = layers.kind_of(m).name
        if kind == "converted":
            continue
        target = name
        if kind == "lora" and not config.merges_lora:
            target, m = f"{name}.base_layer", m.base_layer
        if isinstance(m, _WeightFakeQuantMixin) or config.is_target(target):
            found[target] = (m.in_features, m.out_features)
    return found


def is_converted(model: nn.Module) -> bool:
    return any(getattr(m, CONVERTED_FLAG, False) for m in model.modules())


def prepare(model: nn.Module, config: QATConfig) -> list:
    """Swap every target layer of ``model`` for a fake-quant layer; returns the swapped names.

    Validates the whole model first, so a bad ``group_size`` fails before anything is changed.
    """
    if is_converted(model):
        raise RuntimeError(
            "QAT: this model was already converted by qft.qat.convert (its quantized layers hold packed integer "
            "weights and cannot be trained). Fit from the checkpoint saved before conversion, or a fresh model; "
            "to evaluate the converted model use trainer.validate/test without QATCallback.")
    names = config.check_model(model)
    swapped = []
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, _WeightFakeQuantMixin):
            if m.weight_scheme != config.weight or m.range_learning != config.range_learning:
                raise ValueError(f"QAT: module {name!r} is already fake-quantized with {m.weight_scheme} "
                                 f"(range_learning={m.range_learning}); the callback asks for {config.weight} "
                                 f"(range_learning={config.range_learning}). Use one QATCallback per model.")
            continue
        kw = dict(weight=config.weight, activation=config.activation, range_learning=config.range_learning,
                  momentum=config.observer_momentum)
        kind = layers.kind_of(m)
        if kind is not None and kind.name == "lora":
            new = FakeQuantLoRALinear(m, **kw)
        elif kind is not None and kind.name in ("linear", "nf4"):
            new = FakeQuantLinear(m, **kw)
        else:
            raise TypeError(f"QAT: module {name!r} is a {type(m).__name__}, which QAT cannot fake-quantize (kinds: "
                            "linear, nf4, lora). Add it to `ignore`.")
        new.scale_init = "mse" if config.init == "mse" else "minmax"  # where learned scales start
        for p in new.qat_params():
            p.qft_lr_scale = config.lr_multiplier  # read by CausalLMModule.configure_optimizers
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.append(name)
    return swapped


def fake_quant_modules(model: nn.Module):
    """``[(name, layer)]`` of every fake-quant layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WeightFakeQuantMixin)]


def set_state(model: nn.Module, enabled: bool, observing: bool) -> None:
    """Switch fake-quant on/off and activation observers on/off in every fake-quant layer."""
    for _, m in fake_quant_modules(model):
        m.qat_enabled.fill_(enabled)
        if m.input_quant is not None and m.input_quant.observed:
            m.input_quant.observing.fill_(observing)
