"""Reading documents as a person sees them: the main content of an HTML page (no navigation,
sidebars, tables of contents or scripts), Markdown and text, the text of a PDF, all cut into chunks
along their own headings; code is text of its section, never a heading. A file is read once, from a
descriptor checked to lie inside the knowledge folder, and HTML and PDF are parsed in a worker
process within a time limit per file.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bs4 is imported where HTML is read: a server with no knowledge base never loads it
    from bs4 import Tag

SUFFIXES = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf"}
LINK_BAR_DEPTH = 4  # how far above a page-to-page link its bar may be
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
    # Removed innermost first (find_all lists a tag before what it holds): each removal walks only what
    # is left inside it, so nested furniture costs its size once. (Asking which of a tag's parents was
    # removed would walk every parent of every tag: quadratic on a page of deeply nested navigation.)
    removed: set[int] = set()
    for tag in reversed(furniture):
        if id(tag) not in removed:  # a link bar may be listed twice
            removed.add(id(tag))
            tag.decompose()
    root = soup.find("main") or soup.select_one("[role=main]") or soup.find("article") or soup.body or soup
    return re.sub(r"\n\s*\n\s*", "\n\n", "".join(_walk(root))).strip()


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
    block = link.parent
    for _ in range(LINK_BAR_DEPTH):  # near it, or it is no bar: a walk to the root on every link is quadratic
        if block is None or block.name in ("p", "div", "td", "li", "body", "main", "article"):
            break
        block = block.parent
    if block is None or block.name not in ("p", "div", "td", "li"):
        return None
    text = len(block.get_text(" ", strip=True))
    linked = sum(len(a.get_text(" ", strip=True)) for a in block.find_all("a"))
    return block if text and linked / text >= 0.3 else None  # "Next: <a>…</a>, Up: <a>…</a>" is mostly its links


def _walk(root: Tag) -> Iterator[str]:
    """The text of a tree, headings as '#' lines and code fenced; with a stack, not recursion, so a
    page nested thousands of tags deep is read like any other."""
    from bs4 import NavigableString, PageElement, Tag

    stack: list[PageElement | str] = list(reversed(list(root.children)))
    while stack:
        node = stack.pop()
        if isinstance(node, str) and not isinstance(node, NavigableString):
            yield node  # a block's closing break, pushed below
        elif isinstance(node, NavigableString):
            if node.__class__ is NavigableString:  # not a comment, doctype or CDATA
                yield re.sub(r"\s+", " ", str(node))
        elif isinstance(node, Tag):
            if re.fullmatch(r"h[1-6]", node.name):
                title = re.sub(r"\s+", " ", node.get_text(" ")).strip()
                yield f"\n\n{'#' * int(node.name[1])} {title}\n\n" if title else ""
            elif node.name == "pre":
                yield "\n\n```\n" + node.get_text().strip("\n") + "\n```\n\n"
            else:
                if node.name in _BLOCKS:
                    yield "\n\n"
                    stack.append("\n\n")
                stack.extend(reversed(list(node.children)))


# ---------------------------------------------------------------------------------------------
# Reading a file: once, from inside the folder; HTML and PDF in a worker within a time limit
# ---------------------------------------------------------------------------------------------


def read_inside(path: Path, root: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's bytes and status, read from one descriptor whose real path is checked to be inside
    `root`: a file swapped for a link to elsewhere after the folder was listed is refused."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("not a regular file")
        if not _opened_path(descriptor, path).is_relative_to(root):
            raise ValueError("it leads out of the knowledge folder")
        if status.st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        with os.fdopen(os.dup(descriptor), "rb") as file:
            raw = file.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        return raw, status
    finally:
        os.close(descriptor)


def _opened_path(descriptor: int, path: Path) -> Path:
    """Where an open descriptor really is: what the kernel says (Linux), or else the path resolved now,
    if it still names the very file that was opened."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:
        resolved = path.resolve()
        opened, named = os.fstat(descriptor), os.stat(resolved)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise ValueError("it was replaced while it was read") from None
        return resolved


def plain_text(raw: bytes) -> str:
    if b"\0" in raw[:8000]:
        raise ValueError("binary content")
    return raw.decode("utf-8")


def pdf_text(raw: bytes, max_chars: int) -> str:
    """A PDF's text (pypdf), refused past max_chars."""
    from pypdf import PdfReader

    size, pages = 0, []
    for page in PdfReader(io.BytesIO(raw)).pages:
        text = (page.extract_text() or "").strip()
        size += len(text)
        if size > max_chars:
            raise ValueError(f"it holds more than {max_chars} characters of text")
        pages.append(text)
    return "\n\n".join(text for text in pages if text)


def parsed(suffix: str, raw: bytes, max_chars: int) -> str:
    """A document's text from its bytes, with headings as '#' lines where the format has them."""
    if suffix == ".pdf":
        try:
            return pdf_text(raw, max_chars)
        except ValueError:
            raise
        except Exception as error:  # pypdf's own errors, of any kind: not a PDF this can read
            raise ValueError(f"not a readable PDF ({type(error).__name__})") from None
    text = plain_text(raw)
    return html_text(text) if suffix in (".html", ".htm") else text


class Reader:
    """Reads documents' text. Markdown and text here; HTML and PDF in one worker process, within
    `seconds` each: a page that would take minutes (a PDF bomb, pathological HTML) costs at most that,
    and the worker is replaced. The worker lives as long as the reader (close() ends it)."""

    def __init__(self, max_chars: int = 20_000_000, seconds: float = 10.0):
        self.max_chars, self.seconds = max_chars, seconds
        self.pool: multiprocessing.pool.Pool | None = None

    def text(self, suffix: str, raw: bytes) -> str:
        suffix = suffix.lower()
        if suffix not in (".html", ".htm", ".pdf"):
            return parsed(suffix, raw, self.max_chars)
        if self.pool is None:  # forkserver: a clean process, not a copy of a server with threads
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(1)
        job = self.pool.apply_async(parsed, (suffix, raw, self.max_chars))
        try:
            return job.get(self.seconds)
        except multiprocessing.TimeoutError:
            self.close()
            raise ValueError(f"its text could not be read within {self.seconds:g} s") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


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
