"""``QuantScheme``: one description of an integer grid, shared by QAT, RTN and GPTQ export.

QAT's fake-quant, ``qft.qat.convert`` and the GPTQ exporter all read the same ``QuantScheme``, so a
model trained against a grid is exported on exactly that grid (torchao's prepare/convert habit).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

GRANULARITIES = ("per_group", "per_channel", "per_tensor", "per_token")
WEIGHT_GRANULARITIES = ("per_group", "per_channel")


@dataclass(frozen=True)
class QuantScheme:
    """An integer quantisation grid.

    Weights use ``per_group`` (``group_size`` input features share a scale, the GPTQ layout) or
    ``per_channel`` (one scale per output row). Activations use ``per_token`` (dynamic: a scale per
    token, computed on the fly) or ``per_tensor`` (a moving-average min/max observer).

    The grid is GPTQ's: ``q = clamp(round(x / scale) + zero, 0, 2**bits - 1)`` and
    ``x_hat = scale * (q - zero)``. The range always includes 0. Symmetric grids fix
    ``zero = 2**(bits-1)`` and ``scale = 2 * absmax / (2**bits - 1)``.
    """

    bits: int = field(default=4, metadata={"help": "Integer width, 2 to 8."})
    group_size: int = field(default=128, metadata={"help": "Input features per scale for per_group."})
    symmetric: bool = field(default=True, metadata={"help": "Fixed mid-grid zero point (GPTQ sym=True)."})
    granularity: str = field(default="per_group", metadata={"help": f"One of {GRANULARITIES}."})
    dynamic: bool = field(default=False, metadata={"help": "Activations: compute ranges per batch (per_token)."})

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantScheme(bits={self.bits!r}): bits must be an integer from 2 to 8.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantScheme(granularity={self.granularity!r}) is unknown; allowed: {list(GRANULARITIES)}."
            )
        if self.granularity == "per_group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(
                f"QuantScheme(group_size={self.group_size!r}): per_group needs a positive integer group_size "
                "(use granularity='per_channel' for one scale per output row)."
            )
        if self.granularity == "per_token" and not self.dynamic:
            raise ValueError("QuantScheme(granularity='per_token', dynamic=False): per_token ranges are dynamic; "
                             "set dynamic=True, or use granularity='per_tensor' for a static observer.")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_for(self, in_features: int) -> int:
        """Columns per scale for a layer with ``in_features`` inputs (per_channel: all of them)."""
        return self.group_size if self.granularity == "per_group" else in_features

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise if this scheme cannot quantise a weight with ``in_features`` columns."""
        if self.granularity == "per_group" and in_features % self.group_size:
            raise ValueError(
                f"QuantScheme(group_size={self.group_size}) does not divide in_features={in_features} of "
                f"module {name!r}; pick a divisor of {in_features}, add the module to `ignore`, or use "
                "granularity='per_channel'."
            )

    def to_dict(self) -> dict:
        return asdict(self)
