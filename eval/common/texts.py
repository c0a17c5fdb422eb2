"""Offline English text for the accuracy scripts (no download): Jane Austen's novels from an R package's
lazy-load database, Debian's handbook and cfi-en HTML, CPython's pydoc topics, or a local file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/share/R/library/janeaustenr",
               "/usr/local/lib/R/site-library/janeaustenr")
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CFI_DIRS = ("/usr/share/doc/cfi-en/html", "/usr/share/cfi-en")
HANDBOOK_DIRS = ("/usr/share/debian-handbook/html/en-US", "/usr/share/doc/debian-handbook/html/en-US")
TEXT_SOURCES = ("austen", "handbook", "cfi", "pydoc")


def html_to_text(html: str) -> str:
    """Crude but dependency-free HTML -> text: drop script/style/head, tags to breaks, unescape entities."""
    import html as htmlmod

    html = re.sub(r"(?is)<(script|style|head|nav)\b.*?</\1>", " ", html)
    html = re.sub(r"(?i)<br\s*/?>|</p>|</h\d>|</li>|</div>|</tr>|</pre>", "\n", html)
    text = htmlmod.unescape(re.sub(r"<[^>]+>", " ", html))
    lines = [re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in text.split("\n")]
    out, blank = [], False
    for ln in lines:
        if ln:
            out.append(ln)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    return "\n".join(out).strip()


def _read_r_lazyload(pkg_dir: Path) -> dict[str, Any]:
    """Objects of an R package's lazy-load data DB (data/Rdata.rdx + Rdata.rdb), parsed with the `rdata` package."""
    import zlib

    import rdata

    data_dir = pkg_dir / "data"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" for the raw blocks
        return _read_r_lazyload_inner(data_dir, rdata, zlib)


def _read_r_lazyload_inner(data_dir: Path, rdata, zlib) -> dict[str, Any]:
    index = rdata.conversion.convert(rdata.parser.parse_data((data_dir / "Rdata.rdx").read_bytes()))  # gzip RDS
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        off, ln = int(offset), int(length)
        obj_bytes = zlib.decompress(blob[off + 4: off + ln])  # each block: 4-byte length, then zlib
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(obj_bytes))
    return out


def _join_wrapped_lines(lines: list[str]) -> str:
    """Project-Gutenberg style hard-wrapped lines -> paragraphs (blank line = paragraph break)."""
    paras, cur = [], []
    for ln in lines:
        ln = ln.strip()
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _austen_text() -> str | None:
    for d in AUSTEN_DIRS:
        p = Path(d)
        if (p / "data" / "Rdata.rdb").is_file():
            try:
                objs = _read_r_lazyload(p)
            except Exception:  # noqa: BLE001 - rdata missing or format change: fall back to other sources
                return None
            books = []
            for name in AUSTEN_BOOKS:
                if name in objs:
                    lines = [str(x) if x is not None else "" for x in list(objs[name])]
                    books.append(_join_wrapped_lines(lines))
            return "\n\n".join(books) if books else None
    return None


def _handbook_text() -> str | None:
    for d in HANDBOOK_DIRS:
        p = Path(d)
        if p.is_dir():
            pages = sorted(p.glob("*.html"))
            if pages:
                return "\n\n".join(html_to_text(pg.read_text(encoding="utf-8", errors="replace")) for pg in pages)
    return None


def _cfi_text() -> str | None:
    for d in CFI_DIRS:
        p = Path(d)
        if p.is_dir():
            pages = sorted(p.glob("ch*web.htm"), key=lambda x: int(re.sub(r"\D", "", x.stem) or 0))
            pages = pages or sorted(p.rglob("*.htm*"))
            if not pages:
                continue
            texts = []
            for pg in pages:
                if pg.suffix == ".gz":  # pragma: no cover - Debian sometimes compresses docs
                    import gzip

                    raw = gzip.decompress(pg.read_bytes()).decode("utf-8", errors="replace")
                else:
                    raw = pg.read_text(encoding="utf-8", errors="replace")
                texts.append(html_to_text(raw))
            return "\n\n".join(texts)
    return None


def pydoc_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


_TEXT_CACHE: dict[str, tuple[str, str]] = {}


HAYSTACK_ORDER = ("cfi", "handbook", "austen", "pydoc")    # modern prose first for needle tasks
PERPLEXITY_ORDER = ("austen", "handbook", "cfi", "pydoc")  # book-length contiguous documents first


def load_text(source: str = "auto", min_words: int = 0, order: tuple[str, ...] = TEXT_SOURCES) -> tuple[str, str]:
    """(name, text) of an offline English text.

    source: austen (r-cran-janeaustenr via rdata), handbook (debian-handbook en-US), cfi (cfi-en),
    pydoc (CPython's pydoc_data topics, always present), a path to a local text/HTML file, or
    auto = the first available source in `order` with at least `min_words` words.
    """
    cache_key = source if source != "auto" else f"auto:{','.join(order)}:{min_words}"
    if cache_key in _TEXT_CACHE:
        return _TEXT_CACHE[cache_key]
    loaders = {"austen": _austen_text, "handbook": _handbook_text, "cfi": _cfi_text, "pydoc": pydoc_text}
    if source == "auto":
        for name in order:
            text = loaders[name]()
            if text and len(text.split()) >= min_words:
                _TEXT_CACHE[cache_key] = (name, text)
                return name, text
        raise RuntimeError("no offline text source found")
    if source in loaders:
        text = loaders[source]()
        if not text:
            hint = {"austen": "apt-get install r-cran-janeaustenr && pip install rdata",
                    "handbook": "apt-get install debian-handbook", "cfi": "apt-get install cfi-en"}.get(source, "")
            raise RuntimeError(f"text source {source!r} is not available ({hint})")
        _TEXT_CACHE[source] = (source, text)
        return source, text
    path = Path(source)
    if path.is_file():
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = html_to_text(raw) if path.suffix.lower() in (".html", ".htm") else raw
        _TEXT_CACHE[source] = (path.name, text)
        return path.name, text
    raise ValueError(f"unknown text source {source!r}; use auto, {', '.join(TEXT_SOURCES)} or a file path")


def text_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()
