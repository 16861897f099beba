"""Degraded views: pure text, image-text pairs (nearest text chunk), MMC4."""

from __future__ import annotations

from pathlib import Path

import interleaf
from interleaf.corpus.base import RawPage
from interleaf.corpus.convert import from_mmc4, to_mmc4, to_pairs, to_text
from interleaf.corpus.document import Document

SAMPLE = Path(interleaf.__file__).parent / "data" / "corpus" / "sample.warc.gz"


def _doc(*nodes) -> Document:
    d = Document(general_metadata={"id": "doc", "url": "http://e.org/p"})
    for n in nodes:
        if n.startswith("img:"):
            d.add_image("http://e.org/" + n[4:], {"alt_text": "alt " + n[4:]})
        else:
            d.add_text(n)
    return d


def test_to_text():
    d = _doc("A.\n\nB.", "img:1.jpg", "C.")
    assert to_text(d) == {"id": "doc", "url": "http://e.org/p", "text": "A.\n\nB.\n\nC."}
    assert to_text(_doc("img:1.jpg")) is None


def test_pairs_take_the_nearest_paragraph():
    d = _doc("Intro.\n\nBefore one.", "img:1.jpg", "After one.\n\nMore.", "img:2.jpg", "img:3.jpg", "Tail.")
    pairs = to_pairs(d)
    assert [p["image"] for p in pairs] == ["http://e.org/1.jpg", "http://e.org/2.jpg", "http://e.org/3.jpg"]
    p1, p2, p3 = pairs
    # equidistant: the text after wins (captions follow images); only the adjacent paragraph is used
    assert (p1["text"], p1["text_before"], p1["text_after"]) == ("After one.", "Before one.", "After one.")
    assert p2["text"] == "More." and p2["text_after"] == "Tail."  # before at distance 1, after at 2
    assert p3["text"] == "Tail." and p3["text_before"] == "More."
    assert p1["id"] == "doc#1" and p1["position"] == 1 and p1["alt_text"] == "alt 1.jpg"
    lone = to_pairs(_doc("img:x.jpg"))
    assert lone[0]["text"] == "alt x.jpg" and lone[0]["text_before"] is None


def test_real_documents_convert(tmp_path):
    from interleaf.corpus.extract import extract
    from interleaf.corpus.warc import read_warc

    docs = [extract(p) for p in read_warc(SAMPLE) if isinstance(p, RawPage)]
    docs = [d for d in docs if isinstance(d, Document)]
    assert docs
    for d in docs:
        assert from_mmc4(to_mmc4(d)) == d
        pairs = to_pairs(d)
        assert len(pairs) == d.n_images
        assert all(p["text"] and p["image"].startswith(("http://", "https://")) for p in pairs)
        assert to_text(d)["text"] == d.text
