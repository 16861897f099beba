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
    recs = list(S.iter_sample_pages())
    html = [r for r in recs if r[2].startswith("text/html")]
    images = [r for r in recs if r[2].startswith("image/")]
    assert len(html) >= 40 and len(images) >= 5
    assert all(r[0].startswith(S.SAMPLE_BASE_URL) for r in recs)
    with_img = [r for r in html if b"<img" in r[1].lower()]
    assert len(with_img) >= 30
    assert b"XSLT" in html[0][1] or any(b"XSLT" in r[1] for r in html)


@pytest.mark.skipif(not S.LIBXSLT_DOC.is_dir(), reason="libxslt1-dev HTML manual not installed")
def test_sample_rebuild_is_byte_identical(tmp_path):
    out = tmp_path / "s.warc.gz"
    S.write_warc(out, S.libxslt_records())
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
