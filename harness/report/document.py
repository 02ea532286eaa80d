"""A report as headings, paragraphs, tables (DataFrames) and images, rendered to Markdown and to HTML.

The HTML page is self-contained: images are embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


class Document:
    """Headings, paragraphs, tables (DataFrames) and images, rendered to Markdown and to HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def table_or(self, df, empty: str, intro: str | None = None) -> None:
        """The table (after its introduction), or the sentence that says why there is none."""
        if df.empty:
            self.para(empty)
            return
        if intro:
            self.para(intro)
        self.table(df)

    def figure(self, path: Path | None, alt: str, intro: str | None = None) -> bool:
        """The plot (after its introduction) when there is one; whether there was."""
        if path is None:
            return False
        if intro:
            self.para(intro)
        self.image(path, alt)
        return True

    @property
    def images(self) -> list[Path]:
        return [item[0] for kind, item in self.blocks if kind == "img"]

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, item in self.blocks:
            if kind == "h":
                level, text = item
                out += ["#" * level + " " + text, ""]
            elif kind == "p":
                out += [item, ""]
            elif kind == "table":
                out += [_markdown_table(item), ""]
            else:
                path, alt = item
                out += [f"![{alt}]({path.name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, item in self.blocks:
            if kind == "h":
                level, text = item
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "p":
                body.append(f"<p>{_inline(item)}</p>")
            elif kind == "table":
                body.append(item.to_html(index=False, border=0, classes="t", na_rep="-", escape=True))
            else:
                path, alt = item
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
                body.append(f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        return _HTML.format(title=html.escape(self.title), body="\n".join(body))


def _markdown_table(df) -> str:
    df = df.astype(object).where(df.notna(), "-")
    df = df.map(lambda v: str(v).replace("|", "\\|").replace("\n", " "))
    return df.to_markdown(index=False, disable_numparse=True)


def _inline(text: str) -> str:
    """Markdown `code` and **bold** as HTML, everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }}
table.t th, table.t td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }}
table.t th {{ background: #f4f4f4; }}
table.t td:first-child, table.t th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #666; font-size: 0.85em; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
</style></head>
<body>
{body}
</body></html>
"""
