"""The honesty audit: did every op on the executed inference path run on quantized values?

>>> report = qswap.audit(qmodel, net_input)
>>> report.honest, report.verdict
>>> for v in report.violations: print(v.module, v.op, v.operand, v.source)

It watches aten ops with a dispatch mode (``tracker``), classifies each by a table
(``ops``), and checks that quantizer outputs really lie on their grids. docs/honesty.md
explains what counts as float.
"""
import sys
import types

from qswap.audit.api import audit
from qswap.audit.report import HonestyReport, OpCount, PathCoverage, Violation

__all__ = ["HonestyReport", "OpCount", "PathCoverage", "Violation", "audit"]


class _CallablePackage(types.ModuleType):
    """``qswap.audit`` names both this package and the function: importing the package binds
    the package as the attribute ``qswap.audit``, so the package itself calls the function."""

    def __call__(self, *args, **kwargs) -> HonestyReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
