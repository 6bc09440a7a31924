"""Conformance over diffusers' DiT families: the checks behind the README's support matrix.

    python -m duca_compile.conformance                      # run every family, print the matrix
    python -m duca_compile.conformance --readme README.md   # and rewrite it between the markers
"""
from .checks import MARKERS, Report, check, matrix, write_readme
from .expected import EXPECTED, Expected

__all__ = ["Expected", "EXPECTED", "Report", "check", "matrix", "write_readme", "MARKERS"]
