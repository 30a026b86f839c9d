"""Reading documents as a person sees them: the main content of an HTML page (no navigation,
sidebars, tables of contents or scripts), Markdown and text, the text of a PDF (in a child process,
within a time limit), all cut into chunks along their own headings; code is text of its section,
never a heading.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bs4 is imported where HTML is read: a server with no knowledge base never loads it
    from bs4 import Tag

SUFFIXES = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf"}
MAX_CHUNK_CHARS = 1200
OVERLAP_CHARS = 150

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")

# ---------------------------------------------------------------------------------------------
# HTML: the main content, as Markdown-like text
# ---------------------------------------------------------------------------------------------

_NOT_CONTENT = {
    "script",
    "style",
    "noscript",
    "template",
    "svg",
    "nav",
    "header",
    "footer",
    "aside",
    "form",
    "button",
    "iframe",
}
_NOT_CONTENT_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary"}
_PAGE_LINKS = {"next", "prev", "up"}  # rel= of the links between pages of a manual
# Class or id words that mark page furniture in documentation themes (Sphinx, MkDocs, Docusaurus...).
_FURNITURE = re.compile(
    r"(^|[-_ ])(nav|navbar|navigation|sidebar|sidebar-?wrapper|toc|tocs|menu|breadcrumbs?|"
    r"footer|related|skip-?link|headerlink|prev-?next|pagination)([-_ ]|$)",
    re.I,
)
_BLOCKS = {
    "p",
    "div",
    "li",
    "dt",
    "dd",
    "tr",
    "table",
    "section",
    "article",
    "blockquote",
    "ul",
    "ol",
    "dl",
    "main",
    "figure",
    "figcaption",
    "br",
    "hr",
}


def html_text(html: str) -> str:
    """An HTML page's main content as text: headings as '#' lines, code blocks fenced."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    furniture = []
    for tag in soup.find_all(True):  # one pass (CSS selectors cost a second per large page)
        if _is_furniture(tag):
            furniture.append(tag)
        elif tag.name == "a" and _PAGE_LINKS.intersection(tag.get("rel") or ()) and (bar := _link_bar(tag)):
            furniture.append(bar)
    # Only the outermost of nested furniture is removed: that takes the rest with it. (Asking a
    # live tag whether it was decomposed searches its whole subtree in bs4: quadratic on a big page.)
    marked = {id(tag) for tag in furniture}
    for tag in furniture:
        if id(tag) in marked and not any(id(parent) in marked for parent in tag.parents):
            tag.decompose()
            marked.discard(id(tag))
    root = soup.find("main") or soup.select_one("[role=main]") or soup.find("article") or soup.body or soup
    parts: list[str] = []
    _walk(root, parts)
    return re.sub(r"\n\s*\n\s*", "\n\n", "".join(parts)).strip()


def _is_furniture(tag: Tag) -> bool:
    """Scripts, navigation, headers and footers, sidebars, tables of contents: not what a page says."""
    if tag.name in _NOT_CONTENT or tag.get("role") in _NOT_CONTENT_ROLES:
        return True
    if tag.name == "a":  # a link is text, often a heading's own ("toc-backref"), unless it is a permalink's ¶
        return "headerlink" in (tag.get("class") or [])
    marks = " ".join([*(tag.get("class") or []), str(tag.get("id") or "")])
    return bool(_FURNITURE.search(marks)) and tag.name not in ("body", "html", "main", "article")


def _link_bar(link: Tag) -> Tag | None:
    """The "Next: … Previous: … Up: …" bar a page-to-page link sits in (texinfo, many
    generators): the nearest block around it, when a good part of its text is link text."""
    block = link.find_parent(("p", "div", "td", "li"))
    if block is None or block.name in ("body", "main", "article"):
        return None
    text = len(block.get_text(" ", strip=True))
    linked = sum(len(a.get_text(" ", strip=True)) for a in block.find_all("a"))
    return block if text and linked / text >= 0.3 else None  # "Next: <a>…</a>, Up: <a>…</a>" is mostly its links


def _walk(node: Tag, parts: list[str]) -> None:
    from bs4 import NavigableString, Tag

    for child in node.children:
        if isinstance(child, NavigableString):
            if child.__class__ is NavigableString:  # not a comment, doctype or CDATA
                parts.append(re.sub(r"\s+", " ", str(child)))
        elif isinstance(child, Tag):
            if re.fullmatch(r"h[1-6]", child.name):
                title = re.sub(r"\s+", " ", child.get_text(" ")).strip()
                parts.append(f"\n\n{'#' * int(child.name[1])} {title}\n\n" if title else "")
            elif child.name == "pre":
                parts.append("\n\n```\n" + child.get_text().strip("\n") + "\n```\n\n")
            elif child.name in _BLOCKS:
                parts.append("\n\n")
                _walk(child, parts)
                parts.append("\n\n")
            else:
                _walk(child, parts)


# ---------------------------------------------------------------------------------------------
# PDF: in a child process, so a hostile file (a decompression bomb, a page that takes minutes)
# costs at most `seconds` and cannot hold the index or the server's memory
# ---------------------------------------------------------------------------------------------

_PDF_TEXT = """
import sys
from pypdf import PdfReader
limit, size, pages = int(sys.argv[2]), 0, []
for page in PdfReader(sys.argv[1]).pages:
    text = (page.extract_text() or "").strip()
    size += len(text)
    if size > limit:
        sys.exit(3)
    pages.append(text)
sys.stdout.buffer.write("\\n\\n".join(text for text in pages if text).encode("utf-8"))
"""


def pdf_text(path: Path, max_chars: int, seconds: float) -> str:
    """A PDF's text (pypdf), extracted within a time and a size limit."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PDF_TEXT, str(path), str(max_chars)],
            capture_output=True,
            timeout=seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(f"its text could not be extracted within {seconds:g} s") from None
    if done.returncode == 3:
        raise ValueError(f"it holds more than {max_chars} characters of text")
    if done.returncode:
        raise ValueError("not a readable PDF")
    return done.stdout.decode("utf-8", "replace")


def read_document(path: Path, max_chars: int = 20_000_000, pdf_seconds: float = 10.0) -> str:
    """A document's text, with headings as '#' lines where the format has them."""
    if path.suffix.lower() == ".pdf":
        return pdf_text(path, max_chars, pdf_seconds)
    raw = path.read_bytes()
    if b"\0" in raw[:8000]:
        raise ValueError("binary content")
    text = raw.decode("utf-8")
    return html_text(text) if path.suffix.lower() in (".html", ".htm") else text


# ---------------------------------------------------------------------------------------------
# Chunks: along headings and paragraphs, a fenced code block one paragraph of its section
# ---------------------------------------------------------------------------------------------


def blocks(text: str) -> Iterator[tuple[str, bool]]:
    """The text's paragraphs, each with whether it is code (a fenced block, kept whole, fences off)."""
    current: list[str] = []
    fence = ""
    for line in text.splitlines():
        if fence:
            if line.strip().startswith(fence):
                yield "\n".join(current), True
                current, fence = [], ""
            else:
                current.append(line)
        elif match := _FENCE.match(line):
            if current:
                yield "\n".join(current), False
            current, fence = [], match.group(1)
        elif not line.strip():
            if current:
                yield "\n".join(current), False
            current = []
        else:
            current.append(line)
    if current:
        yield "\n".join(current), bool(fence)


def _tail(text: str) -> str:
    """The end of a chunk carried into the next one, starting at a word boundary."""
    tail = text[-OVERLAP_CHARS:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < len(tail) // 2 else tail


def _pieces(block: str) -> Iterator[str]:
    """A paragraph longer than a chunk, cut at line or sentence ends, so no chunk grows unbounded.
    It is read once, from an offset: slicing off what was cut each time would copy the rest of a
    megabyte paragraph once per chunk."""
    at = 0
    while len(block) - at > MAX_CHUNK_CHARS:
        limit = at + MAX_CHUNK_CHARS
        cut = max(block.rfind("\n", at, limit), block.rfind(". ", at, limit) + 1)
        cut = cut if cut > at + MAX_CHUNK_CHARS // 2 else limit
        yield block[at:cut].strip()
        at = cut
        while at < len(block) and block[at].isspace():
            at += 1
    yield block[at:].strip()


def chunk_markdown(text: str) -> list[tuple[str, str]]:
    """Split a document into (heading path, text) chunks along headings and paragraphs.

    A section longer than a chunk continues in the next one, which starts with the last words of
    the one before (the overlap), so a fact cut in two is still found whole in one of them."""
    chunks: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []  # (level, title) of the headings the text sits under
    paragraphs: list[str] = []

    def flush() -> None:
        current, where = "", " › ".join(title for _, title in path)
        for paragraph in paragraphs:
            if current and len(current) + len(paragraph) > MAX_CHUNK_CHARS:
                chunks.append((where, current))
                current = _tail(current) + " …"
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current:
            chunks.append((where, current))
        paragraphs.clear()

    for block, code in blocks(text):
        block = block.strip("\n") if code else block.strip()
        heading = None if code else _HEADING.match(block.splitlines()[0]) if block else None
        if heading:
            flush()
            level = len(heading.group(1))
            while path and path[-1][0] >= level:  # a sibling or an uncle ends the sections below it
                path.pop()
            path.append((level, heading.group(2).strip().strip("#").strip()))
            block = "\n".join(block.splitlines()[1:]).strip()
        if block.strip():
            paragraphs.extend(_pieces(block))
    flush()
    return chunks
