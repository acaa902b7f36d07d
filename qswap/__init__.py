"""qswap: honest, checkable fake-quantization for fairseq speech models.

>>> import qswap
>>> qmodel = qswap.convert(model, "w8a8")          # a copy; `model` is untouched
>>> qswap.calibrate(qmodel, batches)               # observers run, then freeze
>>> report = qswap.audit(qmodel, net_input)        # did every op run on quantized values?

``import qswap`` imports torch but neither fairseq nor torchaudio.
"""
from qswap.errors import (AudioError, AuditError, BudgetError, CalibrationError, CheckpointError, ConvertError,
                          DataError, IntegerizeError, QswapError, RecipeError, RegistryError, SpecError,
                          UnsafeCheckpointError)
from qswap.nn import QuantConfig, QuantModule, register  # registers the torch.nn counterparts
from qswap.quant import FakeQuantize, QuantSpec
from qswap.recipe import Recipe, load_recipe, shipped_recipe_names
from qswap.convert import QswapWarning, convert
from qswap.calibrate import calibrate
from qswap.regrid import Regridded, regrid
from qswap.sensitivity import sensitivity
from qswap.search import search
from qswap.integerize import integerize

__version__ = "0.1.0"

__all__ = [
    "AudioError", "AuditError", "BudgetError", "CalibrationError", "CheckpointError", "ConvertError", "DataError",
    "FakeQuantize", "IntegerizeError", "QswapError", "QswapWarning", "QuantConfig", "QuantModule", "QuantSpec",
    "Recipe", "RecipeError", "Regridded", "RegistryError", "SpecError", "UnsafeCheckpointError",
    "calibrate", "convert", "integerize", "load_recipe", "plugin_dir", "regrid", "register", "search", "sensitivity",
    "shipped_recipe_names",
]


def plugin_dir() -> str:
    """The folder to pass as fairseq's ``--user-dir`` (registers the ``*_qswap`` tasks)."""
    from pathlib import Path
    return str(Path(__file__).parent / "fairseq_plugin" / "qswap_fairseq_plugin")


def __getattr__(name: str):
    if name == "audit":  # the honesty checker pulls in torch's dispatch machinery: load lazily
        from qswap.honesty import audit
        return audit
    raise AttributeError(f"module 'qswap' has no attribute {name!r}")
