"""The embedded corpus sample: real pages with images, licence noted, deterministic rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest

from interleaf.corpus import sample as S


def test_sample_is_small_real_and_licensed():
    p = S.sample_path()
    assert p.stat().st_size < 2_000_000 and S.is_gzip(p)
    notice = (S.data_dir() / "NOTICE").read_text()
    assert "MIT" in notice and "libxslt" in notice and "Daniel Veillard" in notice
    assert "Apache License 2.0" in notice and "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in notice
    recs = list(S.iter_sample_pages())
    html = [r for r in recs if r[2].startswith("text/html")]
    images = [r for r in recs if r[2].startswith("image/")]
    assert len(html) >= 55 and len(images) >= 30
    bases = (S.SAMPLE_BASE_URL, "https://httpd.apache.org/docs/2.4/", "https://docs.python.org/3.11/")
    assert all(r[0].startswith(bases) for r in recs)
    assert {b for b in bases if any(r[0].startswith(b) for r in html)} == set(bases)
    with_img = [r for r in html if b"<img" in r[1].lower()]
    assert len(with_img) >= 30
    assert b"XSLT" in html[0][1] or any(b"XSLT" in r[1] for r in html)


@pytest.mark.skipif(
    not (S.LIBXSLT_DOC.is_dir() and S.APACHE_DOC.is_dir() and S.PYTHON_DOC.is_dir()),
    reason="the Debian HTML manuals (libxslt1-dev, apache2-doc, python3.11-doc) are not installed",
)
def test_sample_rebuild_is_byte_identical(tmp_path):
    out = tmp_path / "s.warc.gz"
    S.write_warc(out, S.sample_records())
    assert out.read_bytes() == S.sample_path().read_bytes()


def test_bench_warc_varies_urls(tmp_path):
    out = tmp_path / "b.warc.gz"
    n = S.make_bench_warc(out, 120)
    recs = list(S.iter_sample_pages(out))
    assert n == len(recs) == 120
    assert len({r[0] for r in recs}) == 120
    assert len({r[1] for r in recs}) == 120


def test_missing_sample_is_a_clear_error(monkeypatch, tmp_path):
    from interleaf.errors import InputError

    monkeypatch.setattr(S, "data_dir", lambda: Path(tmp_path))
    with pytest.raises(InputError, match="sample missing"):
        S.sample_path()
