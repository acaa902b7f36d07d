"""The honesty audit (``qswap.audit`` is its entry point, ``qswap.honesty`` the package): did every op on the executed inference path run on quantized values?

>>> report = qswap.audit(qmodel, net_input)
>>> report.honest, report.verdict
>>> for v in report.violations: print(v.module, v.op, v.operand, v.source)

It watches aten ops with a dispatch mode (``tracker``), classifies each by a table
(``ops``), and checks that quantizer outputs really lie on their grids. docs/honesty.md
explains what counts as float.
"""
from qswap.honesty.api import audit
from qswap.honesty.report import HonestyReport, OpCount, PathCoverage, Violation

__all__ = ["HonestyReport", "OpCount", "PathCoverage", "Violation", "audit"]
