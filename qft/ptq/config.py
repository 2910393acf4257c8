"""``W8A8Config``: int8 weights and int8 activations after training, validated when it is built.

One object drives the whole post-training pass (``qft.ptq.quantize_w8a8``) and the checkpoint it
writes (``qft.ptq.save_w8a8``), so the grid the model is evaluated on is the grid the file declares.
Both grids are ``QuantScheme``s, the ones QAT trains against: int8 symmetric per output channel for
the weights; per token at run time (``dynamic``) or one calibrated scale per layer input (``static``)
for the activations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qft.quant import QuantScheme

ACTIVATIONS = ("dynamic", "static")
WEIGHT_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class W8A8Config:
    """Post-training int8 quantization of weights and activations (vLLM's W8A8 int8 schemes)."""

    activation: str = field(default="dynamic", metadata={
        "help": "dynamic: each token's input is quantized at run time with its own scale (no calibration); "
                "static: one scale per layer input, calibrated on the export's calibration data."})
    smoothquant: float | None = field(default=None, metadata={
        "help": "SmoothQuant migration strength alpha in [0, 1] (Xiao et al., 2023; 0.5 in the paper, 0.8 in "
                "llm-compressor's W8A8 example and the best of 0.5-0.9 on SmolLM2 here): moves activation "
                "outliers into the weights through a per-channel scale folded into the norm or linear that "
                "produces the input. None: off."})
    weight_method: str = field(default="rtn", metadata={
        "help": "rtn: round each weight to its per-channel int8 grid; gptq: solve the codes with GPTQ on the "
                "calibration data (what llm-compressor recommends for W8A8)."})
    damp_percent: float = field(default=0.01, metadata={"help": "GPTQ's Hessian damping (weight_method='gptq')."})
    ignore: tuple = field(default=("lm_head",), metadata={
        "help": "Layers left in floating point; only decoder-block linears are ever quantized."})

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"W8A8Config(activation={self.activation!r}) is unknown; allowed: {list(ACTIVATIONS)} "
                             "(dynamic needs no calibration; static calibrates one scale per layer input).")
        sq = self.smoothquant
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, (int, float)) or not 0 <= sq <= 1):
            raise ValueError(f"W8A8Config(smoothquant={sq!r}): a migration strength in [0, 1] (0.5 is the paper's "
                             "default), or None to switch SmoothQuant off.")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"W8A8Config(weight_method={self.weight_method!r}) is unknown; allowed: "
                             f"{list(WEIGHT_METHODS)}.")
        if not isinstance(self.damp_percent, (int, float)) or not 0 < self.damp_percent < 1:
            raise ValueError(f"W8A8Config(damp_percent={self.damp_percent!r}): a fraction in (0, 1), e.g. 0.01.")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def weight_scheme(self) -> QuantScheme:
        return QuantScheme(bits=8, symmetric=True, granularity="per_channel")

    @property
    def activation_scheme(self) -> QuantScheme:
        if self.activation == "dynamic":
            return QuantScheme(bits=8, symmetric=True, granularity="per_token", dynamic=True)
        return QuantScheme(bits=8, symmetric=True, granularity="per_tensor")

    @property
    def needs_calibration(self) -> bool:
        return self.activation == "static" or self.smoothquant is not None or self.weight_method == "gptq"

    def gptq_config(self):
        """The weight solve, as the GPTQ exporter's config (int8, one group per row, symmetric)."""
        from qft.export import GPTQConfig

        return GPTQConfig.from_scheme(self.weight_scheme, method=self.weight_method, damp_percent=self.damp_percent)

    def to_dict(self) -> dict:
        return asdict(self)
