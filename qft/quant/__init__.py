"""Integer grids shared by QAT, RTN and GPTQ export."""
from .grid import rtn_fake_quant_weight, rtn_quantize_weight, scale_zero_from_range, weight_params
from .pack import pack_gptq, unpack_gptq
from .qlinear import GPTQLinear
from .qweight import InputGrid, QuantizedWeight
from .scheme import QuantScheme

__all__ = ["QuantScheme", "InputGrid", "GPTQLinear", "QuantizedWeight", "pack_gptq", "unpack_gptq",
           "rtn_quantize_weight", "rtn_fake_quant_weight", "scale_zero_from_range", "weight_params"]
