"""The embedded corpus sample: real web pages with images that no one on the project wrote.

``interleaf/data/corpus/sample.warc.gz`` holds HTML manuals as Debian ships them (licences in
``NOTICE`` next to it): the libxslt/libexslt manual (``libxslt1-dev``, MIT; 47 pages), seven
Apache httpd 2.4 manual pages with figures (``apache2-doc``, Apache-2.0) and six Python 3.11
documentation pages with figures (``python3.11-doc``, PSF licence). They are archived the way a
crawler archives the web: one gzip member per WARC record, ``response`` records with HTTP headers,
the pages under their original URLs, and the images the pages show as ``image/*`` response
records too (readers count them as non-HTML payloads; the image fetcher can serve them offline,
see ``warc_image_source``). With the default pipeline the sample yields a small real corpus (the
OmniCorpus image rules and Gopher rules remove most documentation pages: GIF figures, site logos,
code-heavy text).

``scripts/make_corpus_sample.py`` rebuilds the file; ``make_bench_warc`` repeats the sample
pages under varied URLs for benchmarks.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from interleaf.errors import InputError

SAMPLE_NAME = "sample.warc.gz"
SAMPLE_BASE_URL = "http://xmlsoft.org/XSLT/"
LIBXSLT_DOC = Path("/usr/share/doc/libxslt1-dev/html")


def data_dir() -> Path:
    """The package folder holding the embedded sample and its NOTICE."""
    return Path(__file__).resolve().parent.parent / "data" / "corpus"


def sample_path() -> Path:
    """Path of the embedded sample WARC (raises ``InputError`` if the package lacks it)."""
    p = data_dir() / SAMPLE_NAME
    if not p.exists():
        raise InputError(
            f"{p}: embedded corpus sample missing (rebuild: python scripts/make_corpus_sample.py)"
        )
    return p


def _http_response(payload: bytes, content_type: str) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + payload


def write_warc(path: str | Path, records: Iterable[tuple[str, bytes, str, str]]) -> int:
    """Write ``(url, payload, content_type, iso_date)`` as gzip WARC ``response`` records.

    Deterministic: record ids derive from the URL and date, so the same pages give the same bytes.
    Returns the number of records written.
    """
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    n = 0
    path = Path(path)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, payload, ctype, date in records:
            http = StatusAndHeaders(
                "200 OK",
                [("Content-Type", ctype), ("Content-Length", str(len(payload)))],
                protocol="HTTP/1.1",
            )
            rid = hashlib.sha1(f"{url}|{date}".encode()).hexdigest()
            rec = writer.create_warc_record(
                url,
                "response",
                payload=io.BytesIO(payload),
                http_headers=http,
                warc_headers_dict={
                    "WARC-Date": date,
                    "WARC-Record-ID": f"<urn:uuid:{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:32]}>",
                },
            )
            writer.write_record(rec)
            n += 1
    return n


def _date_of(p: Path) -> str:
    ts = datetime.fromtimestamp(int(p.stat().st_mtime), tz=timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _page_record(url: str, p: Path) -> tuple[str, bytes, str, str]:
    raw = p.read_bytes()
    charset = "ISO-8859-1" if b"ISO-8859-1" in raw[:2000] else "UTF-8"
    return (url, raw, f"text/html; charset={charset}", _date_of(p))


def _image_record(url: str, p: Path) -> tuple[str, bytes, str, str]:
    ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return (url, p.read_bytes(), ctype, _date_of(p))


def libxslt_records(root: Path = LIBXSLT_DOC) -> list[tuple[str, bytes, str, str]]:
    """The libxslt manual's pages (top level, EXSLT, tutorial) and their images, as WARC records."""
    if not root.is_dir():
        raise InputError(f"{root}: libxslt HTML manual not found (apt-get install libxslt1-dev)")
    files: list[Path] = []
    for sub in ("", "EXSLT", "tutorial"):
        d = root / sub
        files += sorted(p for p in d.iterdir() if p.suffix.lower() in (".html", ".gif", ".png", ".jpg"))
    out = []
    for p in files:
        url = SAMPLE_BASE_URL + p.relative_to(root).as_posix()
        out.append(_page_record(url, p) if p.suffix == ".html" else _image_record(url, p))
    return out


def _pages_with_images(root: Path, base_url: str, pages: list[str]) -> list[tuple[str, bytes, str, str]]:
    """``pages`` (paths under ``root``) and the local images they show, under ``base_url``."""
    if not root.is_dir():
        raise InputError(f"{root}: HTML manual not found")
    out, images = [], {}
    for rel in pages:
        p = root / rel
        raw = p.read_bytes()
        out.append(_page_record(base_url + rel, p))
        for src in re.findall(rb"<img[^>]+src=\"([^\"]+)\"", raw):
            q = (p.parent / src.decode("latin-1")).resolve()
            if q.is_file() and q.is_relative_to(root.resolve()):
                images[q.relative_to(root.resolve()).as_posix()] = q
    out += [_image_record(base_url + rel, q) for rel, q in sorted(images.items())]
    return out


APACHE_DOC = Path("/usr/share/doc/apache2-doc/manual")
APACHE_PAGES = [  # the English manual pages with figures (Apache-2.0)
    "en/caching.html",
    "en/developer/modguide.html",
    "en/filter.html",
    "en/mod/mod_filter.html",
    "en/rewrite/intro.html",
    "en/rewrite/tech.html",
    "en/ssl/ssl_intro.html",
]
PYTHON_DOC = Path("/usr/share/doc/python3.11/html")
PYTHON_PAGES = [  # the Python 3.11 documentation pages with figures (PSF licence)
    "howto/logging.html",
    "library/hashlib.html",
    "library/pathlib.html",
    "library/tkinter.messagebox.html",
    "library/turtle.html",
    "using/windows.html",
]


def sample_records() -> list[tuple[str, bytes, str, str]]:
    """All records of the embedded sample: libxslt (MIT), Apache httpd (Apache-2.0), Python (PSF)."""
    return (
        libxslt_records()
        + _pages_with_images(APACHE_DOC, "https://httpd.apache.org/docs/2.4/", APACHE_PAGES)
        + _pages_with_images(PYTHON_DOC, "https://docs.python.org/3.11/", PYTHON_PAGES)
    )


def iter_sample_pages(path: str | Path | None = None) -> Iterator[tuple[str, bytes, str, str]]:
    """``(url, payload, content_type, date)`` of every response record of a WARC (default: sample)."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path or sample_path(), "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type != "response":
                continue
            ctype = rec.http_headers.get_header("Content-Type") if rec.http_headers else ""
            yield (
                rec.rec_headers.get_header("WARC-Target-URI"),
                rec.content_stream().read(),
                ctype or "",
                rec.rec_headers.get_header("WARC-Date"),
            )


def make_bench_warc(path: str | Path, n_pages: int, source: str | Path | None = None) -> int:
    """A WARC of ``n_pages`` HTML pages: the sample's pages repeated under varied URLs and dates.

    Each copy gets a distinct URL, crawl date and one distinct sentence, so that the extractor
    and filters do the full work on every copy (URL dedup does not apply).
    """
    pages = [r for r in iter_sample_pages(source) if r[2].startswith("text/html")]
    if not pages:
        raise InputError(f"{source or sample_path()}: no HTML pages")

    def gen() -> Iterator[tuple[str, bytes, str, str]]:
        for i in range(n_pages):
            url, payload, ctype, _ = pages[i % len(pages)]
            k = i // len(pages)
            marker = f"<p>Copy {k} of this page was archived for benchmark run {i}.</p>".encode()
            body = payload.replace(b"</body>", marker + b"</body>", 1)
            day = 1 + (i % 28)
            yield (f"{url}?copy={k}", body, ctype, f"2024-{1 + k % 12:02d}-{day:02d}T00:00:00Z")

    return write_warc(path, gen())


def warc_image_source(path: str | Path | None = None) -> dict[str, bytes]:
    """``{image URL: bytes}`` of the image records of a WARC (an offline source for the fetcher)."""
    return {u: b for u, b, ct, _ in iter_sample_pages(path) if ct.startswith("image/")}


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


__all__ = [
    "sample_path",
    "write_warc",
    "libxslt_records",
    "make_bench_warc",
    "iter_sample_pages",
    "warc_image_source",
    "data_dir",
    "is_gzip",
]
