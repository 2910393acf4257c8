"""One protocol for every kind of linear layer qft meets, so QAT, merge, export, distillation and
checkpoint loading all see "the linear layers" the same way.

A model fine-tuned with qft holds linears of several kinds: plain ``nn.Linear``; bitsandbytes NF4
``Linear4bit``; peft LoRA layers over either (``lora.Linear``, ``lora.bnb.Linear4bit``); QAT's fake-quant
layers (``FakeQuantLinear``, ``FakeQuantLoRALinear``); and converted ``GPTQLinear`` layers. Each kind is
registered here once (``KINDS``, most specific first) and answers the same questions:

- ``base_weight(m)``: the fp32 weight ``[out, in]`` under any adapter (NF4 dequantized);
- ``base_trainable(m)``: whether training changed that weight (a full fine-tune) or it is frozen, so
  that a merge may take it from the original checkpoint instead;
- ``adapters(m)``: the LoRA adapters it applies (``LoraView``s), none for plain layers;
- ``bias(m)``;
- ``grid(m)``: the integer grid the layer is already tied to (``QuantizedWeight``: what QAT learned,
  or what a converted layer holds), or ``None`` when the exporter must choose one;
- ``scheme(m)``: the ``QuantScheme`` of that grid;
- ``input_grid(m)``: how the layer quantizes its input (``InputGrid``: QAT's activation fake-quant,
  or a W8A8 layer's), or ``None`` for a weight-only layer.

The functions below derive everything else: ``linear_layers`` (the outermost layer of each kind,
never an adapter's own ``lora_A``/``lora_B`` or a ``base_layer``), ``weight`` (base + adapters, what
training computed before any fake-quant) and ``adapter_delta``. A new layer kind (GGUF, AWQ, sparse)
is one more ``Kind`` here, not a special case in each consumer.

Also here, because every consumer needs them: ``fake_quant_disabled`` and ``adapters_disabled``
(the self-teacher's "full-precision view" of a QAT/LoRA student).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

PEFT_PREFIXES = ("model.base_model.model.", "base_model.model.")


@dataclass
class LoraView:
    """One LoRA adapter as a layer applies it: ``delta = scaling * B @ A`` (``fan_in_fan_out`` transposed)."""

    name: str
    A: nn.Linear
    B: nn.Linear
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        A = self.A.weight.detach().float()
        if mask is not None:
            if mask.shape != A.shape:
                raise ValueError(f"adapter mask of shape {tuple(mask.shape)} does not fit lora_A {tuple(A.shape)}.")
            A = A * mask.to(A.device, torch.float32)
        d = (self.B.weight.detach().float() @ A) * float(self.scaling)
        return d.t() if self.fan_in_fan_out else d


def _dequantized(param) -> torch.Tensor:
    """fp32 value of a weight parameter, dequantizing a bitsandbytes ``Params4bit``."""
    if getattr(param, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(param.data, param.quant_state).float()
    return param.detach().float()


def is_nf4_param(param) -> bool:
    return getattr(param, "quant_state", None) is not None


def _peft_lora_views(m) -> list[LoraView]:
    if any(getattr(m, "use_dora", {}).get(a, False) for a in m.active_adapters):
        raise NotImplementedError("qft merges and exports plain LoRA adapters; DoRA (use_dora=True) is not supported.")
    if getattr(m, "disable_adapters", False) or getattr(m, "merged", False):
        return []
    return [LoraView(a, m.lora_A[a], m.lora_B[a], float(m.scaling[a]), bool(getattr(m, "fan_in_fan_out", False)))
            for a in m.active_adapters if a in m.lora_A]


class Kind:
    """A kind of linear layer; subclasses override what differs. Defaults describe a plain layer."""

    name = "linear"

    def matches(self, m: nn.Module) -> bool:
        raise NotImplementedError

    def base_weight(self, m) -> torch.Tensor:
        return _dequantized(m.weight)

    def base_trainable(self, m) -> bool:
        return bool(getattr(m.weight, "requires_grad", False)) and not is_nf4_param(m.weight)

    def adapters(self, m) -> list[LoraView]:
        return []

    def bias(self, m) -> Optional[torch.Tensor]:
        return getattr(m, "bias", None)

    def grid(self, m):
        return None

    def scheme(self, m):
        return None

    def input_grid(self, m):
        return None


class LinearKind(Kind):
    name = "linear"

    def matches(self, m):
        w = getattr(m, "weight", None)
        return isinstance(m, nn.Linear) and w is not None and w.is_floating_point() and not is_nf4_param(w)


class NF4Kind(Kind):
    """bitsandbytes ``Linear4bit`` (frozen NF4/FP4 base weights)."""

    name = "nf4"

    def matches(self, m):
        return isinstance(m, nn.Linear) and is_nf4_param(getattr(m, "weight", None))

    def base_trainable(self, m):
        return False


class LoraKind(Kind):
    """peft LoRA over any base kind (``lora.Linear``, ``lora.bnb.Linear4bit``): the base answers for itself."""

    name = "lora"

    def matches(self, m):
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:  # pragma: no cover - peft is a dependency
            return False
        return isinstance(m, LoraLayer) and hasattr(m, "base_layer") and hasattr(m, "lora_A")

    def base_weight(self, m):
        return weight(m.base_layer)

    def base_trainable(self, m):
        return base_trainable(m.base_layer)

    def adapters(self, m):
        return _peft_lora_views(m)

    def bias(self, m):
        return bias(m.base_layer)

    def grid(self, m):
        return grid(m.base_layer)

    def scheme(self, m):
        return scheme(m.base_layer)

    def input_grid(self, m):
        return input_grid(m.base_layer)


class FakeQuantKind(Kind):
    """QAT's fake-quant layers: their grid is what ``qft.qat.convert`` would pack."""

    name = "fake_quant"

    def matches(self, m):
        from qft.qat.layer import _WeightFakeQuantMixin

        return isinstance(m, _WeightFakeQuantMixin)

    def base_weight(self, m):
        return m.base_weight().detach().float()

    def base_trainable(self, m):
        return base_trainable(m.base_layer) if hasattr(m, "base_layer") else Kind.base_trainable(self, m)

    def adapters(self, m):
        return m.lora_views() if hasattr(m, "lora_views") else []

    def bias(self, m):
        return m.layer_bias()

    def grid(self, m):
        return m.quantized_weight()

    def scheme(self, m):
        return m.weight_scheme

    def input_grid(self, m):
        return None if m.input_quant is None else m.input_quant.grid()


class ConvertedKind(Kind):
    """``GPTQLinear`` (and ``ActQuantGPTQLinear``, its activation-quantized wrapper): packed integers."""

    name = "converted"

    def matches(self, m):
        from qft.quant import GPTQLinear

        return isinstance(m, GPTQLinear) or isinstance(getattr(m, "linear", None), GPTQLinear)

    @staticmethod
    def _q(m):
        return m if hasattr(m, "qweight") else m.linear

    def base_weight(self, m):
        return self._q(m).dequantized_weight().float()

    def base_trainable(self, m):
        return False

    def bias(self, m):
        return self._q(m).bias

    def grid(self, m):
        return self._q(m).quantized_weight()

    def scheme(self, m):
        from qft.quant import QuantScheme

        q = self._q(m)
        per_channel = q.group_size >= q.in_features
        return QuantScheme(bits=q.bits, group_size=q.group_size if not per_channel else 128, symmetric=q.sym,
                           granularity="per_channel" if per_channel else "per_group")

    def input_grid(self, m):
        aq = getattr(m, "input_quant", None)
        return None if aq is None else aq.grid()


class W8A8Kind(Kind):
    """``qft.ptq.W8A8Linear``: int8 weights per output channel with int8 inputs (compressed-tensors W8A8)."""

    name = "w8a8"

    def matches(self, m):
        from qft.ptq.layer import W8A8Linear

        return isinstance(m, W8A8Linear)

    def base_weight(self, m):
        return m.dequantized_weight()

    def base_trainable(self, m):
        return False

    def grid(self, m):
        return m.quantized_weight()

    def scheme(self, m):
        from qft.quant import QuantScheme

        return QuantScheme(bits=8, symmetric=True, granularity="per_channel")

    def input_grid(self, m):
        return m.input_grid()


#: Most specific first: the first kind that matches a module decides for it.
KINDS: list[Kind] = [ConvertedKind(), W8A8Kind(), FakeQuantKind(), LoraKind(), NF4Kind(), LinearKind()]


def register_kind(kind: Kind, before: Optional[str] = None) -> None:
    """Add a layer kind (before the kind named ``before``, else ahead of the generic ones)."""
    idx = next((i for i, k in enumerate(KINDS) if k.name == before), len(KINDS) - 2) if before else len(KINDS) - 2
    KINDS.insert(idx, kind)


def kind_of(m: nn.Module) -> Optional[Kind]:
    return next((k for k in KINDS if k.matches(m)), None)


def _kind(m) -> Kind:
    k = kind_of(m)
    if k is None:
        raise TypeError(f"{type(m).__name__} is not a linear layer kind qft knows (see qft.layers.KINDS).")
    return k


def base_weight(m) -> torch.Tensor:
    return _kind(m).base_weight(m)


def base_trainable(m) -> bool:
    return _kind(m).base_trainable(m)


def adapters(m) -> list[LoraView]:
    return _kind(m).adapters(m)


def bias(m) -> Optional[torch.Tensor]:
    return _kind(m).bias(m)


def grid(m):
    return _kind(m).grid(m)


def scheme(m):
    return _kind(m).scheme(m)


def input_grid(m):
    return _kind(m).input_grid(m)


def adapter_delta(m, mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``sum_a scaling_a * B_a @ A_a`` of the layer's active adapters (``mask`` on A), or None."""
    views = adapters(m)
    if not views:
        return None
    return sum(v.delta(mask) for v in views)


def weight(m, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 weight training computed with, before fake-quant: base (dequantized) + adapters."""
    w = base_weight(m)
    d = adapter_delta(m, mask)
    return w if d is None else w + d.to(w.device)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the outermost linear layer of every kind in ``model``, in module order.

    The parts of a layer (a LoRA layer's ``base_layer``/``lora_A``/``lora_B``, a fake-quant layer's
    wrapped modules) are not listed on their own.
    """
    found: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, m in model.named_modules():
        if inside and any(name.startswith(p) for p in inside):
            continue
        if kind_of(m) is not None:
            found[name] = m
            inside += (name + ".",)
    return found


def hf_name(name: str) -> str:
    """A layer name inside a peft model (``base_model.model.model.layers.0.q_proj``) as the plain HF
    model calls it (``model.layers.0.q_proj``)."""
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (the tuner layers stay in place)."""
    if hasattr(model, "get_base_model") and getattr(model, "peft_config", None):
        return model.get_base_model()
    return model


def _by_layer(model: nn.Module, question) -> dict:
    """``{HF layer name: answer}`` of ``question(layer)`` for every linear layer whose answer is not None."""
    out = {}
    for name, m in linear_layers(unwrap(model)).items():
        answer = question(m)
        if answer is not None:
            out[name] = answer
    return out


def grids(model: nn.Module) -> dict[str, object]:
    """``{HF layer name: QuantizedWeight}`` of every layer already tied to an integer grid."""
    return _by_layer(model, grid)


def input_grids(model: nn.Module) -> dict[str, object]:
    """``{HF layer name: InputGrid}`` of every layer that quantizes its input (QAT ``activation=``, W8A8)."""
    return _by_layer(model, input_grid)


def learned_scheme(model: nn.Module):
    """The one ``QuantScheme`` the model's gridded layers were trained on (None if none is); several
    different ones are an error, since one checkpoint has one ``quantization_config``."""
    found = {}
    for name, m in linear_layers(unwrap(model)).items():
        s = scheme(m)
        if s is not None:
            key = (s.bits, s.group_size if s.granularity == "per_group" else -1, s.symmetric)
            found.setdefault(key, (name, s))
    if len(found) > 1:
        shown = [f"{n}: {s}" for n, s in found.values()]
        raise ValueError(f"the model's layers were trained on {len(found)} different grids ({shown}); one checkpoint "
                         "holds one grid. Train them with one QATCallback.")
    return next(iter(found.values()))[1] if found else None


def grid_under_adapter(model: nn.Module) -> list[str]:
    """Layers whose base has a fixed grid while an adapter adds to it outside the grid (QAT with
    ``lora_merged=False``): the merged weight of those is not on any grid that was trained."""
    return [n for n, m in linear_layers(unwrap(model)).items()
            if kind_of(m).name == "lora" and adapters(m) and grid(m) is not None]


# ---------------------------------------------------------------------- switches (the fp view of a student)
FAKE_QUANT_FLAG = "fake_quant_enabled"  # a bool attribute (third-party fake-quant layers)
QAT_BUFFER = "qat_enabled"  # a one-element bool buffer (qft.qat layers)


def _flag(m: nn.Module):
    v = getattr(m, FAKE_QUANT_FLAG, None)
    if isinstance(v, bool):
        return v
    v = getattr(m, QAT_BUFFER, None)
    if torch.is_tensor(v) and v.dtype == torch.bool and v.numel() == 1:
        return bool(v)
    return None


def _set_flag(m: nn.Module, on: bool) -> None:
    if isinstance(getattr(m, FAKE_QUANT_FLAG, None), bool):
        setattr(m, FAKE_QUANT_FLAG, on)
    else:
        getattr(m, QAT_BUFFER).fill_(on)


def fake_quant_switches(model: nn.Module) -> list[nn.Module]:
    """Modules with a fake-quant on/off switch: a bool ``fake_quant_enabled`` or a ``qat_enabled`` buffer."""
    return [m for m in model.modules() if _flag(m) is not None]


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module) -> Iterator[int]:
    """Fake quantization off in ``model`` for the duration; each module's own flag is restored."""
    mods = fake_quant_switches(model)
    saved = [_flag(m) for m in mods]
    try:
        for m in mods:
            _set_flag(m, False)
        yield len(mods)
    finally:
        for m, v in zip(mods, saved):
            _set_flag(m, v)


def adapter_holders(model: nn.Module) -> list[nn.Module]:
    """Layers that apply LoRA adapters themselves, peft's or QAT's merged ones."""
    return [m for m in linear_layers(model).values() if kind_of(m).name in ("lora", "fake_quant")
            and hasattr(m, "lora_A")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Every LoRA adapter off for the duration (peft layers through their ``_disable_adapters`` flag,
    which peft's forward reads, without peft's side effect on ``requires_grad``; QAT's merged layers
    through an empty ``active_adapters``); restored afterwards."""
    mods = adapter_holders(model)
    peft_mods = [m for m in mods if kind_of(m).name == "lora"]
    own = [m for m in mods if kind_of(m).name != "lora"]
    saved_peft = [m._disable_adapters for m in peft_mods]
    saved_own = [m.active_adapters for m in own]
    try:
        for m in peft_mods:
            m._disable_adapters = True
        for m in own:
            m.active_adapters = []
        yield len(mods)
    finally:
        for m, v in zip(peft_mods, saved_peft):
            m._disable_adapters = v
        for m, v in zip(own, saved_own):
            m.active_adapters = v
