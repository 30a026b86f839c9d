"""Third-party documents for the retrieval benchmark, fetched from Debian's archive at bench time.

None of us wrote them, and none is Python's documentation or a Debian manual (those make the
independent check). English: the HTML manuals of Requests (Sphinx, with sidebars and navigation)
and GNU diffutils (texinfo, with navigation bars). Chinese: the simplified-Chinese manual pages of
manpages-zh, rendered by groff as a terminal shows them and saved as Markdown (the sections of a
manual page become its headings). A help centre: LibreOffice's how-to pages in English and
Chinese, what a user asks in everyday words. A second English corpus, git's manual (git-doc),
checks small talk beyond the bench. Cached in bench/.cache; `apt-get download` needs no root.
"""

import gzip
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGES = (
    "python-requests-doc",
    "diffutils-doc",
    "manpages-zh",
    "git-doc",
    "libreoffice-help-en-us",
    "libreoffice-help-zh-cn",
)
REQUESTS_HTML = "usr/share/doc/python-requests-doc/html"
DIFFUTILS_HTML = "usr/share/doc/diffutils"
MAN_ZH = "usr/share/man/zh_CN"
GIT_HTML = "usr/share/doc/git-doc"
LIBREOFFICE_HELP = "usr/share/libreoffice/help"
LIBREOFFICE_GUIDES = ("swriter", "scalc", "simpress", "shared")  # the how-to pages of the help centre


def unpacked() -> Path:
    """The packages, downloaded and unpacked once."""
    root = CACHE / "debian"
    done = root / "done"
    if done.exists() and done.read_text() == " ".join(PACKAGES):
        return root
    shutil.rmtree(root, ignore_errors=True)  # made for another list of packages
    root.mkdir(parents=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=root, check=True, capture_output=True)
    for deb in root.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "files")], check=True)
    done.write_text(" ".join(PACKAGES))
    return root


def man_to_markdown(page: Path) -> str:
    """A manual page as groff renders it for a terminal, its section names as headings."""
    source = gzip.decompress(page.read_bytes())
    rendered = subprocess.run(
        ["groff", "-k", "-mandoc", "-Tutf8", "-rLL=150n", "-P-cbou"], input=source, capture_output=True, check=True
    ).stdout.decode("utf-8", "replace")
    lines = rendered.splitlines()[1:-1]  # the running header and footer
    name = page.name.removesuffix(".gz")
    out = [f"# {name}"]
    for line in lines:
        if line and not line[0].isspace():
            out.append(f"\n## {line.strip()}\n")
        else:
            out.append(re.sub(r"^ {7}", "", line))
    return "\n".join(out) + "\n"


def english(folder: Path) -> None:
    files = unpacked() / "files"
    shutil.copytree(files / REQUESTS_HTML / "user", folder / "requests" / "user")
    shutil.copytree(files / REQUESTS_HTML / "community", folder / "requests" / "community")
    shutil.copy(files / REQUESTS_HTML / "index.html", folder / "requests" / "index.html")
    (folder / "diffutils").mkdir(parents=True)
    for page in (files / DIFFUTILS_HTML).glob("*.html"):
        if "This file redirects to the location of a node" not in page.read_text():  # texinfo's stubs
            shutil.copy(page, folder / "diffutils" / page.name)


def chinese(folder: Path) -> None:
    files = unpacked() / "files"
    (folder / "man").mkdir(parents=True)
    for page in sorted((files / MAN_ZH).glob("man[18]/*.gz")):
        if page.stat().st_size > 1024:  # the stubs that only point at another page
            (folder / "man" / (page.name.removesuffix(".gz") + ".md")).write_text(man_to_markdown(page))


def third_party(folder: Path) -> Path:
    """English and Chinese third-party documents, written into folder."""
    english(folder / "en")
    chinese(folder / "zh")
    return folder


def help_centre(folder: Path) -> Path:
    """LibreOffice's help centre in English and Chinese: the how-to pages ("guide") of Writer, Calc,
    Impress and the parts they share, as the help browser shows them (HTML)."""
    help_pages = unpacked() / "files" / LIBREOFFICE_HELP
    for language in ("en-US", "zh-CN"):
        for guide in LIBREOFFICE_GUIDES:
            shutil.copytree(help_pages / language / "text" / guide / "guide", folder / language / guide)
    return folder


def git_manual(folder: Path) -> Path:
    """git's manual pages, guides and how-tos (git-doc's HTML), written into folder."""
    pages = unpacked() / "files" / GIT_HTML
    for page in pages.rglob("*.html"):
        (folder / page.relative_to(pages)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, folder / page.relative_to(pages))
    return folder
