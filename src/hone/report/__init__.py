"""Report stage: one self-contained HTML file (plots embedded as PNG data URIs, no network)."""

from hone.report.html import write_report

__all__ = ["write_report"]
