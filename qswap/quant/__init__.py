from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.primitives import choose_qparams, dequantize, fake_quantize, quantize, reduce_min_max
from qswap.quant.spec import QuantSpec

__all__ = ["FakeQuantize", "QuantSpec", "choose_qparams", "dequantize", "fake_quantize", "quantize",
           "reduce_min_max"]
