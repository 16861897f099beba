"""WARC and HTML readers, charset decoding: real pages, and every kind of bad record counted."""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import pytest

import interleaf
from interleaf.corpus.base import RawPage, ReadError
from interleaf.corpus.warc import UndecodableError, decode_html, read_html, read_warc

SAMPLE = Path(interleaf.__file__).parent / "data" / "corpus" / "sample.warc.gz"
BACKENDS = ["fastwarc", "warcio"]


def _real_pages(n: int = 6) -> list[RawPage]:
    """Pages of the embedded sample (the libxslt manual as shipped by Debian)."""
    pages = [p for p in read_warc(SAMPLE) if isinstance(p, RawPage)]
    assert len(pages) >= n
    return pages[:n]


def _write_warc(path: Path, records: list[tuple], gz: bool) -> None:
    """records: (url, body bytes, http headers list, status) for response records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    w.write_record(w.create_warcinfo_record(path.name, {"software": "interleaf-tests"}))
    for url, body, headers, status in records:
        http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))
        req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], is_http_request=True)
        w.write_record(w.create_warc_record(url, "request", http_headers=req))
    path.write_bytes(buf.getvalue())


def _mixed_records() -> list[tuple]:
    real = _real_pages(3)
    html = [("Content-Type", "text/html; charset=utf-8")]
    return [
        (real[0].url, real[0].html, html, "200 OK"),
        (
            "http://example.org/logo.png",
            b"\x89PNG\r\n\x1a\n" + bytes(200),
            [("Content-Type", "image/png")],
            "200 OK",
        ),
        ("http://example.org/missing", b"<html>gone</html>", html, "404 Not Found"),
        (real[1].url, gzip.compress(real[1].html), html + [("Content-Encoding", "gzip")], "200 OK"),
        (
            "http://example.org/broken-gzip",
            b"not gzip at all",
            html + [("Content-Encoding", "gzip")],
            "200 OK",
        ),
        (real[2].url, real[2].html, [], "200 OK"),  # no content type: sniffed
    ]


def _summary(items) -> list[tuple]:
    return [
        ("page", x.url, len(x.html)) if isinstance(x, RawPage) else ("error", x.reason, x.position)
        for x in items
    ]


@pytest.mark.parametrize("gz", [True, False])
def test_reads_pages_and_counts_bad_records(tmp_path, gz):
    path = tmp_path / ("t.warc.gz" if gz else "t.warc")
    _write_warc(path, _mixed_records(), gz)
    real = _real_pages(3)
    results = {}
    for backend in BACKENDS:
        items = list(read_warc(path, backend=backend))
        results[backend] = items
        pages = [x for x in items if isinstance(x, RawPage)]
        errors = [x for x in items if isinstance(x, ReadError)]
        assert [p.url for p in pages] == [real[0].url, real[1].url, real[2].url]
        assert [p.html for p in pages] == [r.html for r in real]  # gzip content encoding undone
        assert sorted(e.reason for e in errors) == ["bad_content_encoding", "http_status", "non_html_payload"]
        assert pages[0].charset == "utf-8" and pages[0].record_id and pages[0].crawl_date
        data = path.read_bytes()
        for p in pages:  # offset/length address the record itself (CC index convention)
            chunk = data[p.warc_record_offset : p.warc_record_offset + p.warc_record_length]
            if gz:
                chunk = gzip.decompress(chunk)
            assert chunk.startswith(b"WARC/1.")
            assert p.url.encode() in chunk[:2000]
            assert p.warc_filename == path.name
    assert _summary(results["fastwarc"]) == _summary(results["warcio"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_record_costs_one_record(tmp_path, gz, backend):
    path = tmp_path / ("c.warc.gz" if gz else "c.warc")
    real = _real_pages(4)
    html = [("Content-Type", "text/html")]
    _write_warc(path, [(p.url, p.html, html, "200 OK") for p in real], gz)
    data = bytearray(path.read_bytes())
    if gz:
        starts = [m.start() for m in re.finditer(rb"\x1f\x8b\x08", bytes(data))]
        members = [s for s in starts if gzip.decompress(bytes(data[s:]))[:8].startswith(b"WARC/1.")]
        victim = members[3]  # warcinfo, resp0, req0, resp1 <- this one
        data[victim + 12 : victim + 40] = bytes(28)  # garbage inside the deflate stream
    else:
        victim = [m.start() + 1 for m in re.finditer(rb"\nWARC/1\.", bytes(data))][2]  # resp1
        data[victim : victim + 8] = b"XXXXXXXX"  # destroy the record's version line
    path.write_bytes(bytes(data))
    items = list(read_warc(path, backend=backend))
    pages = [x.url for x in items if isinstance(x, RawPage)]
    errors = [x for x in items if isinstance(x, ReadError)]
    assert pages == [real[0].url, real[2].url, real[3].url]
    assert [e.reason for e in errors] == ["corrupt_record"]
    assert errors[0].position == victim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path, gz, backend):
    path = tmp_path / ("t.warc.gz" if gz else "t.warc")
    real = _real_pages(3)
    _write_warc(path, [(p.url, p.html, [("Content-Type", "text/html")], "200 OK") for p in real], gz)
    data = path.read_bytes()
    # cut inside the last response record's payload
    last = data.rfind(b"\x1f\x8b\x08") if gz else data.rfind(b"\nWARC/1.")
    prev = data.rfind(b"\x1f\x8b\x08", 0, last) if gz else data.rfind(b"\nWARC/1.", 0, last)
    path.write_bytes(data[: prev + (last - prev) // 2])
    items = list(read_warc(path, backend=backend))
    assert [x.url for x in items if isinstance(x, RawPage)] == [real[0].url, real[1].url]
    errs = [x for x in items if isinstance(x, ReadError)]
    assert len(errs) == 1 and errs[0].reason in ("truncated_record", "corrupt_record")


def test_unreadable_and_empty_files(tmp_path):
    missing = list(read_warc(tmp_path / "nope.warc.gz"))
    assert len(missing) == 1 and missing[0].reason == "unreadable_file"
    (tmp_path / "empty.warc").write_bytes(b"")
    assert list(read_warc(tmp_path / "empty.warc")) == []
    (tmp_path / "junk.warc").write_bytes(b"this is not a warc file at all\n" * 10)
    junk = list(read_warc(tmp_path / "junk.warc"))
    assert all(isinstance(x, ReadError) for x in junk)


def test_chunked_transfer_encoding(tmp_path):
    body = b"<html><body><p>chunked page</p></body></html>"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    http = StatusAndHeaders(
        "200 OK", [("Content-Type", "text/html"), ("Transfer-Encoding", "chunked")], protocol="HTTP/1.1"
    )
    rec = w.create_warc_record(
        "http://example.org/c", "response", payload=io.BytesIO(chunked), http_headers=http
    )
    w.write_record(rec)
    (tmp_path / "c.warc.gz").write_bytes(buf.getvalue())
    (page,) = list(read_warc(tmp_path / "c.warc.gz"))
    assert page.html == body


def test_html_reader_on_files_and_dirs(tmp_path):
    real = _real_pages(2)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.html").write_bytes(real[0].html)
    (tmp_path / "sub" / "b.htm").write_bytes(real[1].html)
    (tmp_path / "notes.txt").write_text("not html")
    pages = list(read_html(tmp_path))
    assert [Path(p.url[len("file://") :]).name for p in pages] == ["a.html", "b.htm"]
    assert pages[0].html == real[0].html and pages[0].crawl_date.endswith("Z")
    (tmp_path / "sub" / "c.html.gz").write_bytes(gzip.compress(real[0].html))
    (tmp_path / "sub" / "broken.html.gz").write_bytes(b"not gzip")
    items = list(read_html(tmp_path))
    assert [x.reason for x in items if isinstance(x, ReadError)] == ["unreadable_file"]
    gz_page = [x for x in items if isinstance(x, RawPage) and x.url.endswith("/sub/c.html")]
    assert gz_page and gz_page[0].html == real[0].html
    for junk in ("c.html.gz", "broken.html.gz"):
        (tmp_path / "sub" / junk).unlink()
    with_base = list(read_html(tmp_path, base_url="http://docs.example.org/manual/"))
    assert [p.url for p in with_base] == [
        "http://docs.example.org/manual/a.html",
        "http://docs.example.org/manual/sub/b.htm",
    ]


# ---------------------------------------------------------------------------------------------
def test_decode_html_charset_order():
    text = "Ça coûte 5 € — naïve"
    assert decode_html(text.encode("utf-8"), "utf-8") == (text, "utf-8")
    # header wins over meta; meta wins over the UTF-8 guess
    latin = ("<meta charset='iso-8859-1'>" + "Ça coûte").encode("cp1252")
    assert decode_html(latin, None)[0].endswith("Ça coûte")
    assert decode_html(latin, None)[1] == "cp1252"  # WHATWG: iso-8859-1 means windows-1252
    assert decode_html(text.encode("utf-16"), None)[0] == text  # BOM
    assert decode_html(b"\xef\xbb\xbfhello", "latin-1") == ("hello", "utf-8")
    # a bogus label falls through to UTF-8
    assert decode_html(text.encode("utf-8"), "no-such-charset")[0] == text
    # a few stray bytes in UTF-8 are tolerated
    page = ("<p>" + "word " * 500 + "</p>").encode() + b"\xff"
    assert decode_html(page, "utf-8")[0].endswith("\ufffd")


def test_decode_html_undecodable():
    import random

    rng = random.Random(0)
    garbage = bytes(rng.randrange(128, 256) for _ in range(4000)) + bytes(
        rng.randrange(0, 32) for _ in range(400)
    )
    with pytest.raises(UndecodableError):
        decode_html(garbage, "utf-8")
    with pytest.raises(UndecodableError, match="binary"):
        decode_html(b"<html>" + bytes(rng.randrange(0, 256) for _ in range(20000)), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_records_are_reported_unread(tmp_path, backend):
    real = _real_pages(2)
    html = [("Content-Type", "text/html")]
    big = b"<html><body>" + b"<p>x</p>" * 20000 + b"</body></html>"
    _write_warc(
        tmp_path / "b.warc.gz",
        [
            (real[0].url, real[0].html, html, "200 OK"),
            ("http://e.org/big", big, html, "200 OK"),
            (real[1].url, real[1].html, html, "200 OK"),
        ],
        True,
    )
    items = list(read_warc(tmp_path / "b.warc.gz", backend=backend, max_record_bytes=100_000))
    assert [x.url for x in items if isinstance(x, RawPage)] == [real[0].url, real[1].url]
    (err,) = [x for x in items if isinstance(x, ReadError)]
    assert err.reason == "record_too_large" and "http://e.org/big" in err.detail


def _bomb(n: int) -> bytes:
    """A page of ``n`` bytes that gzip makes a thousand times smaller."""
    return gzip.compress(b"<html><body><p>" + b" " * n + b"</p></body></html>", 9)


def test_gzip_html_page_is_inflated_up_to_the_limit_only(tmp_path):
    """A 1.4 MB .html.gz inflating to 420 MB was decompressed in full (866 MB RSS) to be refused."""
    import tracemalloc

    from interleaf.corpus import engine as E
    from interleaf.corpus import pipeline as P

    site = tmp_path / "site"
    site.mkdir()
    (site / "big.html.gz").write_bytes(_bomb(60_000_000))
    (site / "small.html.gz").write_bytes(gzip.compress(b"<html><body><p>ok</p></body></html>"))
    (site / "plain.html").write_bytes(b"<html><body><p>" + b"x" * 5000 + b"</p></body></html>")
    tracemalloc.start()
    try:
        pages = list(read_html(site, max_bytes=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    assert [len(p.html) for p in pages] == [1001, 1001, len(b"<html><body><p>ok</p></body></html>")]
    assert len(next(read_html(site / "big.html.gz", max_bytes=None)).html) > 60_000_000  # no limit: whole
    cfg = P.load_config({"read": {"max_page_bytes": 1000}, "filters": []})
    out = tmp_path / "o"
    E.build([site], out, cfg, workers=1, progress=False)
    errors = [r for p in sorted((out / "errors").glob("*.jsonl")) for r in E.read_jsonl(p)]
    assert [(e["reason"], e["detail"]) for e in errors] == [
        ("page_too_large", "more than read.max_page_bytes=1000"),
        ("page_too_large", "more than read.max_page_bytes=1000"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_warc_content_encoding_is_inflated_up_to_the_limit_only(tmp_path, backend):
    real = _real_pages(2)
    html = [("Content-Type", "text/html")]
    gz = html + [("Content-Encoding", "gzip")]
    _write_warc(
        tmp_path / "b.warc.gz",
        [
            ("http://e.org/bomb", _bomb(30_000_000), gz, "200 OK"),
            # two members with zero padding between and after them, which gzip.decompress skips
            (
                real[0].url,
                gzip.compress(real[0].html) + b"\0\0" + gzip.compress(b"<!-- 2nd member -->") + b"\0\0\0",
                gz,
                "200 OK",
            ),  # fmt: skip
            (real[1].url, gzip.compress(real[1].html)[:-30], gz, "200 OK"),  # truncated stream
        ],
        True,
    )
    items = list(read_warc(tmp_path / "b.warc.gz", backend=backend, max_record_bytes=1_000_000))
    bomb, page, bad = items
    assert isinstance(bomb, RawPage) and len(bomb.html) == 1_000_001
    assert page.html == real[0].html + b"<!-- 2nd member -->"
    assert isinstance(bad, ReadError) and bad.reason == "bad_content_encoding"


def test_build_reads_warc_records_up_to_the_page_limit(tmp_path):
    """read.max_page_bytes is the WARC reader's record limit too (plus the HTTP headers' allowance)."""
    from interleaf.corpus import engine as E
    from interleaf.corpus.warc import HTTP_HEADER_ALLOWANCE

    real = _real_pages(1)
    html = [("Content-Type", "text/html")]
    big = b"<html><body>" + b"<p>x</p>" * 200_000 + b"</body></html>"
    assert len(big) > HTTP_HEADER_ALLOWANCE
    _write_warc(
        tmp_path / "b.warc.gz",
        [(real[0].url, real[0].html, html, "200 OK"), ("http://e.org/big", big, html, "200 OK")],
        True,
    )
    limit = len(big) - HTTP_HEADER_ALLOWANCE - 1000  # the record (page + headers) is over limit + allowance
    page, err = E.iter_records([tmp_path / "b.warc.gz"], limit)
    assert page.url == real[0].url and err.reason == "record_too_large"
    assert [type(x) for x in E.iter_records([tmp_path / "b.warc.gz"], len(big))] == [RawPage, RawPage]
