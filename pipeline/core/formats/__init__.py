"""The format table (`table.py`) with the builtin formats registered (`builtin.py`, `a16w4.py`)."""

from . import a16w4, builtin  # noqa: F401  (register the formats)
from .table import Format, FormatSpec, all_formats, get_format, register_format

__all__ = ["Format", "FormatSpec", "register_format", "all_formats", "get_format"]
