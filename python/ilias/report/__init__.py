"""Reports of an evaluation: a JSON dict with everything, a Markdown summary rendered from it,
and the placement among the published ILIAS numbers."""

from .html import to_html, write_html
from .published import Placement, infer_setting, place, published
from .summary import build_report, to_markdown, write_json, write_markdown

__all__ = [
    "Placement", "build_report", "infer_setting", "place", "published",
    "to_html", "to_markdown", "write_html", "write_json", "write_markdown",
]
