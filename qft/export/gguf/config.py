"""``GGUFConfig``: what a GGUF export writes and how it rounds, validated before any work."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .mix import MIXES

QUANTS = tuple(MIXES)
METHODS = ("gptq", "imatrix", "rtn")


@dataclass
class GGUFConfig:
    """How to write a merged (or QAT-trained) model as one GGUF file for llama.cpp."""

    quant: str = field(default="Q4_K_M", metadata={
        "help": f"One of {QUANTS}: llama.cpp's mix of that name (qft.export.gguf.mix), the same per-tensor "
                "formats llama-quantize picks; F16/F32 write unquantized weights."})
    method: str = field(default="gptq", metadata={
        "help": f"One of {METHODS}. 'rtn': each block's scale (and offset) minimises its squared error; "
                "'imatrix': the error of each input feature weighted by its activation energy (mean x^2 on the "
                "calibration data, llama.cpp's importance matrix); 'gptq': the imatrix grid, then GPTQ solves "
                "the codes inside it, compensating each rounding error on the later columns."})
    damp_percent: float = field(default=0.01, metadata={
        "help": "GPTQ's dampening of the Hessian diagonal, as a fraction of its mean."})
    act_group_aware: bool = field(default=True, metadata={
        "help": "GPTQ visits blocks by decreasing activation energy (qft.export.config.GPTQConfig)."})
    tokenizer_pre: str = field(default="auto", metadata={
        "help": "llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). 'auto' copies the tokenizer keys from "
                "the GGUF file the model came from (the built-in smollm2-135m), else writes 'default'."})

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise ValueError(f"GGUFConfig(quant={self.quant!r}) is unknown; allowed: {list(QUANTS)} (llama.cpp's "
                             "mix names; Q4_K_M is the usual choice).")
        if self.method not in METHODS:
            raise ValueError(f"GGUFConfig(method={self.method!r}) is unknown; allowed: {list(METHODS)}.")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"GGUFConfig(damp_percent={self.damp_percent!r}) must be in [0, 1); 0.01 is usual.")
        if not isinstance(self.tokenizer_pre, str) or not self.tokenizer_pre:
            raise ValueError(f"GGUFConfig(tokenizer_pre={self.tokenizer_pre!r}): a llama.cpp pre-tokenizer name "
                             "such as 'llama-bpe' or 'smollm', or 'auto'.")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" and self.quant not in ("F16", "F32")

    def to_dict(self) -> dict:
        return asdict(self)
