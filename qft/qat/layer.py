"""Fake-quant layers that replace linears (plain, NF4, and peft LoRA over either) during QAT.

They take over the original ``weight``/``bias`` Parameter objects (so tied weights, optimizer
references and ``requires_grad`` survive the swap) and keep the state-dict keys of what they
replace, plus their QAT buffers. ``forward(x, *args, **kwargs)`` accepts whatever the caller passes.
Both answer ``qft.layers``' protocol (``base_weight``, ``lora_views``, ``layer_bias``,
``quantized_weight``), which is how merge, export and distillation read them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft.layers import LoraView, _dequantized, _peft_lora_views
from qft.quant import QuantizedWeight, QuantScheme
from qft.quant.grid import weight_params

from .fake_quant import grouped, lsq_fake_quant, ste_fake_quant
from .observer import ActivationFakeQuant


class _WeightFakeQuantMixin(nn.Module):
    """Weight grid state shared by the plain and the LoRA-merged layer.

    Buffers (all in the state dict): ``qat_enabled`` (fake-quant on), ``weight_scale``/``weight_zero``
    ``[out, n_groups]`` (the scales last used; with range learning they are Parameters, initialised
    from the weight the first time fake-quant runs, flagged by ``qat_initialized``).
    """

    def _init_qat(self, in_f: int, out_f: int, weight: QuantScheme, activation, range_learning: bool,
                  momentum: float, device, symmetric_zero: float):
        self.in_features, self.out_features = in_f, out_f
        self.weight_scheme, self.range_learning = weight, range_learning
        self.group = weight.group_for(in_f)
        n_groups = -(-in_f // self.group)  # a short last group (GPTQ allows it) is zero-padded
        self.pad = n_groups * self.group - in_f
        self.register_buffer("qat_enabled", torch.ones((), dtype=torch.bool, device=device))
        self.register_buffer("qat_initialized", torch.zeros((), dtype=torch.bool, device=device))
        scale = torch.ones(out_f, n_groups, device=device)
        zero = torch.full((out_f, n_groups), float(symmetric_zero), device=device)
        if range_learning:
            self.weight_scale = nn.Parameter(scale)
            if weight.symmetric:
                self.register_buffer("weight_zero", zero)
            else:
                self.weight_zero = nn.Parameter(zero)
        else:
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero", zero)
        self.input_quant = None if activation is None else ActivationFakeQuant(activation, momentum)

    def _settings(self) -> dict:
        a = self.input_quant
        return {"weight": self.weight_scheme.to_dict(), "range_learning": self.range_learning,
                "activation": None if a is None else a.scheme.to_dict()}

    scale_init = "minmax"  # range learning's first scales: "minmax" or "mse" (QATConfig.init; set by prepare)
    fixed_grid = False  # True once ``fix_grid`` gave the layer a solved grid (``qft.qat.solve``)
    low_rank = True  # on a fixed grid, LoRA layers skip the dense weight gradient (False: the dense STE, to compare)

    def get_extra_state(self) -> dict:
        """The grid this layer was trained on, saved with its buffers so a mismatched load fails loudly;
        with a solved grid, also its codes and the adapters' snapshot (``fix_grid``)."""
        state = self._settings()
        if self.fixed_grid:
            state["fixed_grid"] = dict(self._grid_state())
        return state

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict):
            return
        state = dict(state)
        fixed = state.pop("fixed_grid", None)
        if state != self._settings():
            raise ValueError(f"QAT: the checkpoint's fake-quant layer was trained with {state}, but this layer is "
                             f"{self._settings()}. Build QATCallback with the checkpoint's settings "
                             "(qft.qat.checkpoint_config(path) reads them).")
        if fixed is not None:
            self._load_grid_state(fixed)
            self.fixed_grid = True

    # ----------------------------------------------------------------- a solved, fixed grid
    @torch.no_grad()
    def fix_grid(self, qw: QuantizedWeight) -> None:
        """Train from now on against ``qw``'s grid: its scales and zeros stay fixed, and the layer's
        weight starts on its codes. Why fixed: the grid is what GPTQ solved for general text and the task
        together (``qft.qat.solve``); min-max scales recomputed each step would walk away from it."""
        from qft.quant.grid import fp16_scale

        if self.range_learning:
            raise ValueError("QAT: a solved grid is fixed; range_learning=True would learn the scales.")
        if qw.codes.shape != (self.out_features, self.in_features) or not torch.equal(
                qw.g_idx.long().cpu(), torch.arange(self.in_features) // self.group):
            raise ValueError(f"QAT grid solve: a grid of codes {tuple(qw.codes.shape)} in groups of {qw.group_size} "
                             f"does not fit this layer ({self.out_features} x {self.in_features}, group {self.group}).")
        dev = self.weight_scale.device
        self.weight_scale.copy_(fp16_scale(qw.scale.float()).to(dev))
        self.weight_zero.copy_(qw.zero.float().to(dev))
        self.qat_initialized.fill_(True)
        self._start_on(qw.codes.to(dev, torch.uint8))
        self.fixed_grid = True

    def _grid_dequantized(self, codes: torch.Tensor) -> torch.Tensor:
        """``scale * (codes - zero)`` in fp32, with the fake-quant's own ops (so it is on its grid)."""
        q = self._padded(codes)
        out = grouped(q, self.group).sub_(self.weight_zero.unsqueeze(-1)).mul_(self.weight_scale.unsqueeze(-1))
        out = out.reshape(q.shape)
        return out[:, : self.in_features] if self.pad else out

    def _start_on(self, codes: torch.Tensor) -> None:
        """Make the weight the solved grid's (a layer that cannot write its weight keeps the codes)."""
        self.register_buffer("grid_codes", codes, persistent=False)

    def _grid_state(self) -> dict:
        return {"codes": self.grid_codes}

    def _load_grid_state(self, state: dict) -> None:
        self.register_buffer("grid_codes", state["codes"].to(self.weight_scale.device), persistent=False)

    def grid_tensors(self) -> list:
        """What a solved grid consists of (rank 0 broadcasts these): scales, zeros, codes or weight."""
        return [self.weight_scale, self.weight_zero, *self._grid_state().values()]

    def qat_params(self):
        """Learned-range parameters (empty without range learning)."""
        return [p for p in (self.weight_scale, self.weight_zero) if isinstance(p, nn.Parameter)]

    def fake_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` ``[out, in]`` on the export grid (float32), with STE/LSQ gradients."""
        s = self.weight_scheme
        w = self._padded(w)
        wg = grouped(w, self.group)
        if self.fixed_grid:
            out = ste_fake_quant(wg, self.weight_scale.unsqueeze(-1), self.weight_zero.unsqueeze(-1), s.maxq)
        elif self.range_learning:
            if not bool(self.qat_initialized):
                scale, zero = weight_params(w, s, mse=self.scale_init == "mse")
                with torch.no_grad():
                    self.weight_scale.copy_(scale)
                    self.weight_zero.copy_(zero)
                    self.qat_initialized.fill_(True)
            out = lsq_fake_quant(wg, self.weight_scale.unsqueeze(-1), self.weight_zero.unsqueeze(-1), s.maxq,
                                 self.group)
        else:
            scale, zero = weight_params(w, s)
            if self.training:
                self.weight_scale.copy_(scale)
                self.weight_zero.copy_(zero)
                self.qat_initialized.fill_(True)
            out = ste_fake_quant(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), s.maxq)
        out = out.reshape(w.shape)
        return out[:, : self.in_features] if self.pad else out

    def _padded(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 weight with zero columns appended to fill a short last group. Zeros never change a
        group's range (ranges always include 0), so the scales equal those of the short group."""
        w = w.float()
        return F.pad(w, (0, self.pad)) if self.pad else w

    def export_params(self, w: torch.Tensor):
        """``(codes [out,in] int32, scale [out,G], zero [out,G])`` exactly as the forward uses them."""
        from qft.quant.grid import fp16_scale, quantize

        s = self.weight_scheme
        w = self._padded(w.detach())
        if self.fixed_grid:
            scale, zero = self.weight_scale.detach().float(), self.weight_zero.detach().float()
        elif self.range_learning and bool(self.qat_initialized):
            scale = fp16_scale(self.weight_scale.detach().float())
            zero = self.weight_zero.detach().float()
            if not s.symmetric:
                zero = torch.clamp(torch.round(zero), 1, s.maxq)
        else:
            scale, zero = weight_params(w, s)
        codes = quantize(grouped(w, self.group), scale.unsqueeze(-1), zero.unsqueeze(-1), s.maxq).reshape(w.shape)
        return codes[:, : self.in_features].to(torch.int32), scale, zero

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The codes and grid this layer's fake-quant forward uses (what ``convert`` packs, what export writes)."""
        codes, scale, zero = self.export_params(self.latent_weight())
        g_idx = torch.arange(self.in_features, device=codes.device, dtype=torch.int32) // self.group
        group = -1 if self.weight_scheme.granularity == "per_channel" else self.group
        return QuantizedWeight(codes, scale, zero, g_idx, self.weight_scheme.bits, group)

    def _unused_qat_params(self) -> torch.Tensor:
        """0 * learned params: keeps them in the autograd graph while fake-quant is off (DDP needs every
        trainable parameter to receive a gradient each step)."""
        return sum(p.sum() for p in self.qat_params()) * 0.0

    def _extra(self) -> str:
        s = self.weight_scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group={self.group}, symmetric={s.symmetric}, range_learning={self.range_learning}")


class FakeQuantLinear(_WeightFakeQuantMixin):
    """A linear whose weight (and optionally input) is fake-quantized on the export grid.

    The weight may be a plain (trainable or frozen) Parameter or a frozen bitsandbytes NF4 one, which
    is dequantized for each forward; under a LoRA adapter (``lora_merged=False``) it is the base only.
    """

    def __init__(self, linear: nn.Linear, weight: QuantScheme, activation: QuantScheme | None = None,
                 range_learning: bool = False, momentum: float = 0.01):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self._init_qat(linear.in_features, linear.out_features, weight, activation, range_learning, momentum,
                       linear.weight.device, (weight.maxq + 1) // 2)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not bool(self.qat_enabled):
            out = F.linear(x, self.base_weight().to(x.dtype), bias)
            return out + self._unused_qat_params().to(out.dtype) if self.range_learning and self.training else out
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.fake_quant_weight(self.base_weight()).to(x.dtype), bias)

    def base_weight(self) -> torch.Tensor:
        """The weight as a tensor the forward can use (NF4 dequantized; a plain Parameter as is; an NF4
        weight given a solved grid: that grid, which NF4 cannot hold)."""
        if hasattr(self.weight, "quant_state"):
            return self._grid_dequantized(self.grid_codes) if self.fixed_grid else _dequantized(self.weight)
        return self.weight

    def latent_weight(self) -> torch.Tensor:
        return self.base_weight()

    def _start_on(self, codes):
        if hasattr(self.weight, "quant_state"):
            return super()._start_on(codes)
        self.weight.data.copy_(self._grid_dequantized(codes).to(self.weight.dtype))

    def _grid_state(self):
        return super()._grid_state() if hasattr(self.weight, "quant_state") else {}  # the weight is in the state dict

    def grid_tensors(self):
        return super().grid_tensors() + ([] if hasattr(self.weight, "quant_state") else [self.weight.data])

    def _load_grid_state(self, state):
        if "codes" in state:
            super()._load_grid_state(state)

    def layer_bias(self):
        return self.bias

    def extra_repr(self) -> str:
        return self._extra()


class FakeQuantLoRALinear(_WeightFakeQuantMixin):
    """A peft LoRA layer computed as ``x @ fq(W + sum_a scaling_a * B_a @ A_a).T + bias``.

    It keeps peft's sub-modules (``base_layer``, ``lora_A``, ``lora_B``) under their names, so the
    state-dict keys are peft's, and peft's ``r``/``lora_alpha``/``scaling`` dicts. The adapter learns
    against the grid ``convert`` and export write the merged weight on. The base may be a plain or a
    bitsandbytes 4-bit Linear (dequantized each forward). LoRA dropout is not applied while fake-quant
    is on (a merged weight has no per-input dropout). While it is off (before ``start_step``) the layer
    computes exactly what peft does, ``base_layer(x) + scaling * B(A(x))``, without forming the merged
    weight, so a QAT run that switches on late costs plain-LoRA time until then.
    """

    def __init__(self, lora_layer, weight: QuantScheme, activation: QuantScheme | None = None,
                 range_learning: bool = False, momentum: float = 0.01):
        super().__init__()
        if any(getattr(lora_layer, "use_dora", {}).get(a, False) for a in lora_layer.active_adapters):
            raise ValueError("QATCallback(lora_merged=True) does not support DoRA adapters (use_dora=True): the "
                             "merged weight is rescaled per column; use lora_merged=False.")
        self.base_layer, self.lora_A, self.lora_B = lora_layer.base_layer, lora_layer.lora_A, lora_layer.lora_B
        self.lora_dropout = lora_layer.lora_dropout
        self.scaling = dict(lora_layer.scaling)
        self.r, self.lora_alpha = dict(lora_layer.r), dict(lora_layer.lora_alpha)
        self.fan_in_fan_out = bool(getattr(lora_layer, "fan_in_fan_out", False))
        self.active_adapters = [a for a in lora_layer.active_adapters if a in self.lora_A]
        in_f, out_f = lora_layer.in_features, lora_layer.out_features
        dev = self.lora_A[self.active_adapters[0]].weight.device if self.active_adapters else None
        self._init_qat(in_f, out_f, weight, activation, range_learning, momentum, dev, (weight.maxq + 1) // 2)

    def base_weight(self) -> torch.Tensor:
        """The frozen base; with a solved grid, the grid minus the adapters as they were when it was
        solved, so that base + adapters (what merge and export read) is the weight being trained."""
        if not self.fixed_grid:
            return _dequantized(self.base_layer.weight)
        w = self._grid_dequantized(self.grid_codes)
        for a in self.active_adapters:
            d = getattr(self, f"grid_B0_{a}").float() @ getattr(self, f"grid_A0_{a}").float()
            w = w - self.scaling[a] * (d.t() if self.fan_in_fan_out else d)
        return w

    def _start_on(self, codes):
        super()._start_on(codes)
        for a in self.active_adapters:
            self.register_buffer(f"grid_A0_{a}", self.lora_A[a].weight.detach().clone(), persistent=False)
            self.register_buffer(f"grid_B0_{a}", self.lora_B[a].weight.detach().clone(), persistent=False)

    def _grid_state(self):
        out = super()._grid_state()
        for a in self.active_adapters:
            out[f"A0_{a}"], out[f"B0_{a}"] = getattr(self, f"grid_A0_{a}"), getattr(self, f"grid_B0_{a}")
        return out

    def _load_grid_state(self, state):
        super()._load_grid_state(state)
        for a in self.active_adapters:
            dev = self.lora_A[a].weight.device
            self.register_buffer(f"grid_A0_{a}", state[f"A0_{a}"].to(dev), persistent=False)
            self.register_buffer(f"grid_B0_{a}", state[f"B0_{a}"].to(dev), persistent=False)

    def lora_views(self) -> list[LoraView]:
        return _peft_lora_views(self)

    def layer_bias(self):
        return getattr(self.base_layer, "bias", None)

    def latent_weight(self) -> torch.Tensor:
        """``W + sum_a scaling_a * B_a @ A_a`` in fp32, differentiable in A and B."""
        w = self.base_weight().float()
        for a in self.active_adapters:
            d = self.lora_B[a].weight.float() @ self.lora_A[a].weight.float()
            w = w + self.scaling[a] * (d.t() if self.fan_in_fan_out else d)
        return w

    merged_weight = latent_weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bias = self.layer_bias()
        bias = None if bias is None else bias.to(x.dtype)
        if not bool(self.qat_enabled):
            out = self.base_layer(x, *args, **kwargs)
            for a in self.active_adapters:
                out = out + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x.to(self.lora_A[a].weight.dtype)))
                                           ).to(out.dtype) * self.scaling[a]
            return out + self._unused_qat_params().to(out.dtype) if self.range_learning and self.training else out
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.fixed_grid and self.low_rank:
            return self._low_rank_forward(x, bias)
        return F.linear(x, self.fake_quant_weight(self.latent_weight()).to(x.dtype), bias)

    def _low_rank_forward(self, x: torch.Tensor, bias) -> torch.Tensor:
        """On a fixed grid: the value of ``x @ fq(W + s*B@A).T``, with the straight-through gradient
        reaching A and B the way plain LoRA's does (``s * B @ A`` has the same gradient as the merged
        weight when rounding counts as identity) and ``x`` through the rounded weight.

        Why: the merged weight then needs no autograd graph and no ``[out, in]`` weight gradient, so a
        QAT step costs about a QLoRA step (1.77 s against 1.70 s on the demo). What it leaves out is the
        clamp mask of ``ste_fake_quant``: a weight pushed past the grid's end still passes gradient. On
        the demo 9e-6 of the weights ended beyond the grid, at most 1.5 steps past it.
        """
        with torch.no_grad():
            w = self.fake_quant_weight(self.latent_weight())
        out = F.linear(x, w.to(x.dtype), bias)
        xd = x.detach()
        for a in self.active_adapters:
            lora = self.lora_B[a](self.lora_A[a](xd.to(self.lora_A[a].weight.dtype))) * self.scaling[a]
            out = out + (lora - lora.detach()).to(out.dtype)  # zero in value, the adapter's gradient in backward
        return out

    def extra_repr(self) -> str:
        return self._extra() + f", adapters={self.active_adapters}" + (", fixed_grid" if self.fixed_grid else "")
