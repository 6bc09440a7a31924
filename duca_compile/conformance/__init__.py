"""Conformance over diffusers' DiT families: the checks behind the support matrix in ``docs/models.md``.

    python -m duca_compile.conformance                      # run every family, print the matrix
    python -m duca_compile.conformance --write docs/models.md   # and rewrite it between the markers
"""
from .checks import MARKERS, Report, check, matrix, write_readme
from .expected import EXPECTED, Expected

__all__ = ["Expected", "EXPECTED", "Report", "check", "matrix", "write_readme", "MARKERS"]
