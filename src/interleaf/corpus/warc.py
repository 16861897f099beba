"""Readers for raw web pages: WARC files (gzip or plain) and single HTML files / directories.

``read_warc(path)`` yields one ``RawPage`` per HTTP ``response`` record with an HTML payload and a
``ReadError`` for every other response record it cannot use (truncated or corrupt record, non-HTML
payload, non-2xx status, broken content encoding); warcinfo/request/metadata/revisit records are
not pages and are skipped without a count. After a corrupt gzip member or record header the reader
re-synchronises on the next gzip member / ``WARC/1.x`` line, so one bad record costs one record.

Record offset and length are those of the record in the file as stored (compressed offsets for
``.warc.gz``), i.e. what a Common Crawl index calls ``offset`` / ``length``: a byte-range read of
``[offset, offset + length)`` gives back the record.

The fast path uses FastWARC (Resiliparse); warcio is the fallback (``backend="warcio"``). HTTP
headers, chunked transfer encoding and gzip/deflate/br content encodings are handled here for
both backends, so the two give the same pages.

``decode_html(raw, declared)`` turns payload bytes into text: byte-order mark, then the declared
charset (HTTP header), then ``<meta charset>``, then UTF-8, then charset-normalizer's guess; bytes
that none of these decode (more than ``max_bad_ratio`` replacement characters) raise
``UndecodableError`` - extraction records it as a reason, it never crashes a run.
"""

from __future__ import annotations

import codecs
import gzip
import mmap
import os
import re
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from interleaf.corpus.base import RawPage, ReadError
from interleaf.errors import InputError

HTML_TYPES = ("text/html", "application/xhtml+xml", "application/xhtml", "text/xhtml")
HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".shtml", ".html.gz", ".htm.gz")
WARC_SUFFIXES = (".warc", ".warc.gz", ".arc.gz", ".warc.wet.gz")


class UndecodableError(InputError):
    """Page bytes that no plausible charset decodes."""


# ---------------------------------------------------------------------------------------------
# charset detection
# ---------------------------------------------------------------------------------------------
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]{1,40})""", re.I)
# WHATWG: these labels mean windows-1252 in browsers
_WHATWG_ALIASES = {"iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
                   "us-ascii": "cp1252", "ascii": "cp1252", "x-sjis": "shift_jis", "gb2312": "gb18030",
                   "gbk": "gb18030", "x-user-defined": "cp1252"}  # fmt: skip


def charset_from_content_type(content_type: str | None) -> str | None:
    """``text/html; charset=UTF-8`` -> ``utf-8``."""
    if not content_type:
        return None
    m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_:.\-]+)", content_type, re.I)
    return m.group(1).lower() if m else None


def _normalize_charset(label: str | None) -> str | None:
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _WHATWG_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_html(raw: bytes, declared: str | None = None, max_bad_ratio: float = 0.01) -> tuple[str, str]:
    """Decode page bytes; return ``(text, encoding)`` or raise ``UndecodableError``."""
    if raw.startswith(codecs.BOM_UTF8):
        return raw[3:].decode("utf-8", errors="replace"), "utf-8"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace"), "utf-16"
    nuls = raw.count(b"\x00")
    if nuls >= 8 and nuls > 0.001 * len(raw):  # NUL bytes: a binary payload, not a page in any charset
        raise UndecodableError(f"binary payload ({nuls} NUL bytes)")
    candidates: list[str] = []
    for label in (declared, _meta_charset(raw), "utf-8"):
        enc = _normalize_charset(label)
        if enc and enc not in candidates:
            candidates.append(enc)
    for enc in candidates:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            pass
        except LookupError:  # pragma: no cover - normalised above
            continue
    # a few stray bytes in an otherwise fine page are common on the web: tolerate them
    for enc in candidates:
        text = raw.decode(enc, errors="replace")
        if text.count("\ufffd") <= max_bad_ratio * max(len(text), 1):
            return text, enc
    guess = _guess_charset(raw)
    if guess:
        text = raw.decode(guess, errors="replace")
        if text.count("\ufffd") <= max_bad_ratio * max(len(text), 1) and _looks_like_text(text):
            return text, guess
    raise UndecodableError(f"undecodable bytes (tried {', '.join(candidates + ([guess] if guess else []))})")


def _meta_charset(raw: bytes) -> str | None:
    m = _META_CHARSET.search(raw, 0, 4096)
    return m.group(1).decode("ascii", errors="ignore") if m else None


def _guess_charset(raw: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - optional
        return None
    best = from_bytes(raw[:65536]).best()
    return _normalize_charset(best.encoding) if best is not None else None


def _looks_like_text(text: str) -> bool:
    """Reject binary garbage that a single-byte charset 'decodes': too many control characters."""
    sample = text[:20000]
    if not sample:
        return False
    controls = sum(1 for c in sample if c < " " and c not in "\t\n\r\f")
    return controls <= 0.01 * len(sample)


# ---------------------------------------------------------------------------------------------
# HTTP block parsing (shared by both backends)
# ---------------------------------------------------------------------------------------------
def _parse_http_block(block: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Split a WARC response block into (status, lower-cased headers, body)."""
    end = block.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end = block.find(b"\n\n")
        sep = 2
    if end < 0:
        return None, {}, b""
    head = block[:end].decode("latin-1")
    body = block[end + sep :]
    lines = head.splitlines()
    status = None
    if lines and lines[0].startswith("HTTP/"):
        parts = lines[0].split(None, 2)
        if len(parts) >= 2 and parts[1].isdigit():
            status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    return status, headers, body


def _dechunk(body: bytes) -> bytes:
    out = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("chunked body without a chunk size line")
        size = int(body[pos:eol].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        start = eol + 2
        if start + size > len(body):
            raise ValueError("truncated chunk")
        out.append(body[start : start + size])
        pos = start + size + 2


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` decompressed (every gzip member), at most ``limit + 1`` bytes of it: a small
    compressed page that inflates to gigabytes is not inflated in full to be refused."""
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(body, limit + 1 - len(out))
        if len(out) > limit:  # over the limit: the rest is never inflated
            return bytes(out)
        if not d.eof:
            raise EOFError("compressed data ended before the end-of-stream marker was reached")
        body = d.unused_data.lstrip(b"\0")  # zero padding between gzip members, as gzip.decompress allows
        if wbits != 31 or not body:
            return bytes(out)


def _decode_content(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.lower().strip()
    if encoding in ("", "identity", "none"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return _inflate(body, 31, limit)
    if encoding == "deflate":
        try:
            return _inflate(body, 15, limit)  # zlib-wrapped, as the RFC says
        except zlib.error:
            return _inflate(body, -15, limit)  # raw deflate, as many servers send it
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # optional

        return brotli.decompress(body)
    raise ValueError(f"unsupported content encoding {encoding!r}")


def _is_html(content_type: str, body: bytes) -> bool:
    ct = content_type.split(";")[0].strip().lower()
    if ct:
        return ct in HTML_TYPES
    head = body[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def _record_to_page(
    source: str,
    warc_headers: dict[str, str],
    block: bytes,
    content_length: int,
    offset: int,
    length: int | None,
    max_bytes: int,
) -> RawPage | ReadError:
    """Turn one response record into a RawPage, or a ReadError saying why not.

    A compressed body is inflated to at most ``max_bytes + 1`` bytes (a larger page is refused
    later as ``page_too_large`` anyway)."""
    url = warc_headers.get("warc-target-uri", "")
    if len(block) < content_length or not url:
        return ReadError(source, offset, "truncated_record", f"{len(block)} of {content_length} bytes")
    status, http, body = _parse_http_block(block)
    if status is None:
        return ReadError(source, offset, "bad_http_headers", url)
    if not 200 <= status < 300:
        return ReadError(source, offset, "http_status", f"{status} {url}")
    try:
        if "chunked" in http.get("transfer-encoding", "").lower():
            body = _dechunk(body)
        body = _decode_content(body, http.get("content-encoding", ""), max_bytes)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is this record's reason
        return ReadError(source, offset, "bad_content_encoding", f"{url}: {exc}"[:300])
    content_type = warc_headers.get("warc-identified-payload-type") or http.get("content-type", "")
    if not _is_html(content_type, body):
        return ReadError(source, offset, "non_html_payload", f"{content_type or 'unknown'} {url}"[:300])
    record_id = warc_headers.get("warc-record-id", "").strip("<>") or None
    return RawPage(
        url=url,
        html=body,
        content_type=http.get("content-type", "text/html"),
        charset=charset_from_content_type(http.get("content-type")),
        crawl_date=warc_headers.get("warc-date") or None,
        warc_filename=os.path.basename(source),
        warc_record_offset=offset,
        warc_record_length=length,
        record_id=record_id,
    )


# ---------------------------------------------------------------------------------------------
# WARC readers
# ---------------------------------------------------------------------------------------------
class _Resync:
    """Internal marker: the backend stopped at a corrupt record at ``position``; restart after it."""

    def __init__(self, position: int) -> None:
        self.position = position


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def next_record_start(path: str, after: int, gz: bool) -> int | None:
    """Offset of the next gzip member / WARC header line strictly after ``after``."""
    size = os.path.getsize(path)
    if after >= size:
        return None
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if gz:
            pos = mm.find(b"\x1f\x8b\x08", after + 1)
            return pos if pos >= 0 else None
        pos = mm.find(b"\nWARC/1.", after)
        return pos + 1 if pos >= 0 else None


MAX_RECORD_BYTES = 50_000_000  # larger response records are not read (a video is not a page)
# a response record is the page and its HTTP headers: a build reads records of up to
# read.max_page_bytes + this, so that no page within the limit is refused for its headers
HTTP_HEADER_ALLOWANCE = 1 << 20


def read_warc(
    path: str | os.PathLike, backend: str = "auto", max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[RawPage | ReadError]:
    """Yield a ``RawPage`` per HTML response record of a WARC file, a ``ReadError`` per bad one.

    Response records larger than ``max_record_bytes`` are reported (``record_too_large``) unread.
    """
    path = str(path)
    if backend == "auto":
        try:
            import fastwarc  # noqa: F401

            backend = "fastwarc"
        except ImportError:  # pragma: no cover - fastwarc is a dependency
            backend = "warcio"
    if backend not in ("fastwarc", "warcio"):
        raise InputError(f"unknown WARC backend {backend!r} (fastwarc or warcio)")
    try:
        gz = _is_gzip(path)
        size = os.path.getsize(path)
    except OSError as exc:
        yield ReadError(path, None, "unreadable_file", str(exc))
        return
    start = 0
    reader = _iter_fastwarc if backend == "fastwarc" else _iter_warcio
    while start is not None and start < size:
        failed_at = None
        for item in reader(path, start, size, max_record_bytes):
            if isinstance(item, _Resync):
                failed_at = item.position
                continue
            yield item
        if failed_at is None:
            return
        start = next_record_start(path, int(failed_at), gz)


def _skipped_bytes(mm: mmap.mmap | None, pos: int, content_length: int, next_pos: int) -> int | None:
    """In a plain WARC, where a record that the parser silently skipped begins (None if none was).

    A record is ``header block, CRLF CRLF, content_length bytes, CRLF CRLF``; a next record that
    starts later than that means bytes were skipped (a corrupt header the parser resynced over).
    """
    if mm is None:
        return None
    header_end = mm.find(b"\r\n\r\n", pos, next_pos)
    if header_end < 0:
        return None
    expected = header_end + 4 + content_length + 4
    return expected if next_pos > expected + 2 else None


def _record_end(path: str, mm: mmap.mmap | None, gz: bool, pos: int, content_length: int) -> int | None:
    """Where the record starting at ``pos`` should end: its declared length (plain), next member (gzip)."""
    if mm is not None:
        header_end = mm.find(b"\r\n\r\n", pos)
        if header_end >= 0:
            return min(header_end + 4 + content_length + 4, len(mm))
        return None
    if gz:
        return _gzip_member_end(path, pos)
    return next_record_start(path, pos, gz)


def _gzip_member_end(path: str, pos: int) -> int | None:
    """End offset of the gzip member starting at ``pos`` (None if it does not decompress)."""
    dec = zlib.decompressobj(31)
    fed = 0
    with open(path, "rb") as fh:
        fh.seek(pos)
        try:
            while not dec.eof:
                chunk = fh.read(1 << 16)
                if not chunk:
                    return None
                fed += len(chunk)
                dec.decompress(chunk, 1 << 20)
                while dec.unconsumed_tail and not dec.eof:  # bounded output per step
                    dec.decompress(dec.unconsumed_tail, 1 << 20)
        except zlib.error:
            return None
    return pos + fed - len(dec.unused_data)


def _open_mmap(fh, gz: bool) -> mmap.mmap | None:
    if gz:
        return None
    try:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError):  # empty file
        return None


def _too_large(path: str, pos: int, headers: dict[str, str], content_length: int, limit: int) -> ReadError:
    url = headers.get("warc-target-uri", "")
    return ReadError(path, pos, "record_too_large", f"{content_length} bytes > {limit} {url}"[:300])


def _iter_fastwarc(path: str, start: int, size: int, max_bytes: int) -> Iterator[RawPage | ReadError]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    gz = _is_gzip(path)
    pending = None  # (offset, headers, block, content_length): yielded once the next offset is known
    prev = None  # (offset, content_length) of the previous record of any type
    base = None  # FastWARC's stream_pos is absolute for a seeked file object; guard against relative
    with open(path, "rb") as fh:
        mm = _open_mmap(fh, gz)
        fh.seek(start)
        it = iter(ArchiveIterator(fh, parse_http=False))
        while True:
            in_read = False
            try:
                rec = next(it)
                if base is None:
                    base = start if rec.stream_pos < start else 0
                pos = base + rec.stream_pos
                if pending is not None:
                    yield _record_to_page(
                        path, pending[1], pending[2], pending[3], pending[0], pos - pending[0], max_bytes
                    )
                    pending = None
                if prev is not None:
                    skipped = _skipped_bytes(mm, prev[0], prev[1], pos)
                    if skipped is not None:
                        yield ReadError(
                            path, skipped, "corrupt_record", f"unparseable bytes {skipped}..{pos}"
                        )
                prev = (pos, rec.content_length)
                if rec.record_type != WarcRecordType.response:
                    continue
                in_read = True
                headers = {k.lower(): v for k, v in rec.headers.items()}
                if rec.content_length > max_bytes:
                    yield _too_large(path, pos, headers, rec.content_length, max_bytes)
                    continue
                block = rec.reader.read()
                pending = (pos, headers, block, rec.content_length)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - corrupt data surfaces as OSError/ValueError
                if in_read:  # this record's own block is broken
                    bad = prev[0]
                else:  # the record after the last good one is broken: it starts where that one ends
                    bad = start if prev is None else (_record_end(path, mm, gz, *prev) or prev[0])
                    if pending is not None:
                        yield _record_to_page(
                            path, pending[1], pending[2], pending[3], pending[0], bad - pending[0], max_bytes
                        )
                yield ReadError(path, bad, "corrupt_record", f"{type(exc).__name__}: {exc}"[:300])
                yield _Resync(bad)
                return
        if pending is not None:
            yield _record_to_page(
                path, pending[1], pending[2], pending[3], pending[0], size - pending[0], max_bytes
            )
        if prev is not None and mm is not None:
            skipped = _skipped_bytes(mm, prev[0], prev[1], size)
            if skipped is not None:
                yield ReadError(path, skipped, "corrupt_record", f"unparseable bytes {skipped}..{size}")


def _iter_warcio(path: str, start: int, size: int, max_bytes: int) -> Iterator[RawPage | ReadError]:
    from warcio.archiveiterator import ArchiveIterator

    gz = _is_gzip(path)
    prev = None  # (offset, content_length) of the previous record of any type
    base = None
    with open(path, "rb") as fh:
        mm = _open_mmap(fh, gz)
        fh.seek(start)
        it = ArchiveIterator(fh, no_record_parse=True, arc2warc=True)
        gen = iter(it)
        while True:
            try:
                rec = next(gen)
                headers = {k.lower(): v for k, v in rec.rec_headers.headers}
                content_length = int(headers.get("content-length", "0") or 0)
                is_response = rec.rec_type == "response"
                too_large = is_response and content_length > max_bytes
                block = rec.raw_stream.read() if is_response and not too_large else b""
                # warcio knows a record's offset and length only once it is consumed
                if base is None:  # offsets are absolute for a seeked file object; guard against relative
                    base = start if it.get_record_offset() < start else 0
                pos = base + it.get_record_offset()
                length = it.get_record_length()
                if prev is not None:
                    skipped = _skipped_bytes(mm, prev[0], prev[1], pos)
                    if skipped is not None:
                        yield ReadError(
                            path, skipped, "corrupt_record", f"unparseable bytes {skipped}..{pos}"
                        )
                prev = (pos, content_length)
                if not is_response:
                    continue
                if too_large:
                    yield _too_large(path, pos, headers, content_length, max_bytes)
                    continue
                yield _record_to_page(path, headers, block, content_length, pos, length, max_bytes)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - ArchiveLoadFailed, zlib.error, EOFError, ...
                # the record after the last good one is broken (warcio reports offsets only after a read)
                bad = start if prev is None else (_record_end(path, mm, gz, *prev) or prev[0])
                yield ReadError(path, bad, "corrupt_record", f"{type(exc).__name__}: {exc}"[:300])
                yield _Resync(bad)
                return
        if prev is not None and mm is not None:
            skipped = _skipped_bytes(mm, prev[0], prev[1], size)
            if skipped is not None:
                yield ReadError(path, skipped, "corrupt_record", f"unparseable bytes {skipped}..{size}")


# ---------------------------------------------------------------------------------------------
# HTML files
# ---------------------------------------------------------------------------------------------
def read_html(
    path: str | os.PathLike, base_url: str | None = None, max_bytes: int | None = None
) -> Iterator[RawPage | ReadError]:
    """Yield a ``RawPage`` per HTML file under ``path`` (a file or a directory, walked in sorted order).

    The page URL is ``base_url`` joined with the file's relative path when given, else the
    file's ``file://`` URL, so relative image ``src`` values resolve to real files. With
    ``max_bytes``, at most ``max_bytes + 1`` bytes of a page are read (a ``.gz`` page is inflated
    as it is read): a larger page is refused as ``page_too_large`` without being held whole.
    """
    root = Path(path)
    if root.is_dir():
        files = [p for p in folder_files(root) if p.name.lower().endswith(HTML_SUFFIXES)]
    else:
        files = [root]
    for f in files:
        try:
            size = -1 if max_bytes is None else max_bytes + 1
            with open(f, "rb") as fh:
                if f.name.lower().endswith(".gz"):  # Debian ships many manuals as .html.gz
                    with gzip.GzipFile(fileobj=fh) as gz:
                        data = gz.read(size)
                else:
                    data = fh.read(size)
            mtime = datetime.fromtimestamp(f.stat().st_mtime, tz=timezone.utc)
        except (OSError, EOFError, zlib.error) as exc:
            yield ReadError(str(f), None, "unreadable_file", str(exc))
            continue
        if f.name.lower().endswith(".gz"):
            f = f.with_name(f.name[:-3])  # the page's own name, for its URL
        if base_url and root.is_dir():
            url = base_url.rstrip("/") + "/" + f.relative_to(root).as_posix()
        elif base_url:
            url = base_url
        else:
            url = f.resolve().as_uri()
        yield RawPage(
            url=url,
            html=data,
            content_type="text/html",
            charset=None,
            crawl_date=mtime.strftime("%Y-%m-%dT%H:%M:%SZ"),
            record_id=None,
        )


def folder_files(root: Path) -> list[Path]:
    """Files below ``root`` in sorted order, hidden files and folders (``.git``, ``.DS_Store``) left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def is_warc_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(WARC_SUFFIXES)
