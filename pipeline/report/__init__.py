"""What a person reads: `report.md` (markdown) and `report.html` (self-contained, inline SVG plots)."""

from .html import histogram_series, render_html, svg_bars, svg_histogram, svg_scatter, worst_histograms
from .markdown import accuracy_header, accuracy_rows, format_table, format_value, render_markdown
from .outputs import OUTPUT_HEADER, output_rows

__all__ = [
    "render_markdown", "accuracy_header", "accuracy_rows", "format_table", "format_value", "render_html", "worst_histograms",
    "histogram_series", "svg_scatter", "svg_bars", "svg_histogram", "OUTPUT_HEADER", "output_rows",
]
