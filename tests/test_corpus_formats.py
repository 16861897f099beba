"""Corpus files: OBELICS/OmniCorpus Parquet and JSONL round trips, bad rows counted, MMC4 lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import interleaf
from interleaf.corpus import formats as F
from interleaf.corpus.base import RawPage, ReadError
from interleaf.corpus.document import Document
from interleaf.errors import InputError

SAMPLE = Path(interleaf.__file__).parent / "data" / "corpus" / "sample.warc.gz"


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    """Real documents: the embedded sample's pages through the extractor."""
    from interleaf.corpus.extract import extract
    from interleaf.corpus.warc import read_warc

    out = [d for p in read_warc(SAMPLE) if isinstance(p, RawPage) for d in [extract(p, drop_no_images=False)]]
    out = [d for d in out if isinstance(d, Document)]
    out[0].general_metadata["filter_scores"] = {"gopher": 1.0, "fluency": 0.25}
    return out


@pytest.mark.parametrize("layout", ["obelics", "omnicorpus"])
def test_parquet_round_trip(tmp_path, docs, layout):
    path = tmp_path / "x.parquet"
    assert F.write_parquet(path, docs, layout=layout) == len(docs)
    back = list(F.read_corpus(path))
    assert back == docs
    assert list(F.read_parquet_documents(path)) == docs
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if layout == "obelics":  # JSON strings, as HuggingFaceM4/OBELICS
        assert str(schema.field("metadata").type) == "string"
    else:  # structs, as OpenGVLab/OmniCorpus-CC
        assert str(schema.field("general_metadata").type).startswith("struct<")


@pytest.mark.parametrize("layout", ["canonical", "obelics", "mmc4"])
def test_jsonl_round_trip(tmp_path, docs, layout):
    path = tmp_path / "x.jsonl.gz"
    assert F.write_jsonl(path, docs, layout=layout) == len(docs)
    assert list(F.read_corpus(path)) == docs


def test_malformed_jsonl_rows_are_counted_with_line_numbers(tmp_path, docs):
    good = [json.dumps(d.to_row()) for d in docs[:3]]
    lines = [
        good[0],
        "{not json",
        json.dumps({"texts": ["a", None], "images": [None]}),  # length mismatch
        "",
        json.dumps({"texts": [None], "images": [None]}),  # empty position
        good[1],
        json.dumps([1, 2, 3]),
        json.dumps({"text_list": ["a"], "image_info": [{"raw_url": "u", "matched_text_index": 5}]}),
        good[2],
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = list(F.read_corpus(path))
    assert [x for x in items if isinstance(x, Document)] == docs[:3]
    errors = [(x.position, x.reason) for x in items if isinstance(x, ReadError)]
    assert errors == [(2, "bad_json"), (3, "bad_row"), (5, "bad_row"), (7, "bad_row"), (8, "bad_row")]
    assert "matched_text_index" in [x for x in items if isinstance(x, ReadError)][-1].detail


def test_truncated_gzip_jsonl(tmp_path, docs):
    path = tmp_path / "t.jsonl.gz"
    F.write_jsonl(path, docs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    items = list(F.read_corpus(path))
    assert isinstance(items[-1], ReadError) and items[-1].reason == "unreadable_line"
    assert all(isinstance(x, Document) for x in items[:-1]) and 0 < len(items) - 1 < len(docs)


def test_malformed_parquet_rows_and_files(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = F.documents_to_table(docs[:3])
    meta = table.column("metadata").to_pylist()
    meta[1] = "{broken"
    texts = table.column("texts").to_pylist()
    texts[2] = texts[2] + ["extra"]  # lists out of step
    bad = table.set_column(0, "texts", pa.array(texts, pa.list_(pa.string())))
    bad = bad.set_column(2, "metadata", pa.array(meta, pa.string()))
    path = tmp_path / "bad.parquet"
    pq.write_table(bad, path)
    items = list(F.read_corpus(path))
    assert items[0] == docs[0]
    assert [(x.position, x.reason) for x in items[1:]] == [(1, "bad_row"), (2, "bad_row")]
    with pytest.raises(InputError, match="row 1"):
        list(F.read_parquet_documents(path))
    (tmp_path / "not.parquet").write_bytes(b"PAR1 this is not parquet")
    (err,) = list(F.read_corpus(tmp_path / "not.parquet"))
    assert err.reason == "unreadable_file" and err.position is None
    (err,) = list(F.read_corpus(tmp_path / "x.csv"))
    assert err.reason == "unknown_format"


def test_mmc4_round_trip_is_lossless(docs):
    for d in docs:
        row = F.to_mmc4(d)
        assert json.loads(json.dumps(row)) == row
        assert F.from_mmc4(row) == d
    # images before the first text, several between two texts, and after the last one
    d = Document(general_metadata={"id": "x", "url": "http://e.org/"})
    for kind, value in [
        ("i", "1"),
        ("i", "2"),
        ("t", "a"),
        ("i", "3"),
        ("t", "b"),
        ("t", "c"),
        ("i", "4"),
        ("i", "5"),
    ]:
        d.add_image(f"http://e.org/{value}.jpg") if kind == "i" else d.add_text(value)
    row = F.to_mmc4(d)
    assert row["text_list"] == ["a", "b", "c"]
    assert [i["matched_text_index"] for i in row["image_info"]] == [0, 0, 1, 2, 2]
    assert [i.get("after_text", False) for i in row["image_info"]] == [False, False, False, True, True]
    assert F.from_mmc4(row) == d


def test_original_mmc4_rows():
    row = {
        "url": "http://e.org/page",
        "text_list": ["First sentence.", "Second sentence.", "Third."],
        "image_info": [
            {
                "image_name": "abc.jpg",
                "raw_url": "http://e.org/b.jpg",
                "matched_text_index": 2,
                "matched_sim": 0.3,
            },
            {
                "image_name": "def.jpg",
                "raw_url": "http://e.org/a.jpg",
                "matched_text_index": 0,
                "matched_sim": 0.2,
            },
        ],
        "similarity_matrix": [[0.1, 0.2, 0.3], [0.2, 0.1, 0.0]],
        "could_have_url_duplicate": 0,
    }
    d = F.from_mmc4(row)
    assert d.texts == [None, "First sentence.", "Second sentence.", None, "Third."]
    assert d.images == ["http://e.org/a.jpg", None, None, "http://e.org/b.jpg", None]
    assert d.metadata[3] == {"url": "http://e.org/b.jpg", "image_name": "abc.jpg", "matched_sim": 0.3}
    assert (
        d.general_metadata["url"] == "http://e.org/page"
        and d.general_metadata["could_have_url_duplicate"] == 0
    )
    # and back: the same sentences and assignments
    back = F.to_mmc4(d)
    assert back["text_list"] == row["text_list"] and back["similarity_matrix"] == row["similarity_matrix"]
    assert {(i["raw_url"], i["matched_text_index"]) for i in back["image_info"]} == {
        ("http://e.org/b.jpg", 2),
        ("http://e.org/a.jpg", 0),
    }
    assert F.row_to_document(row) == d  # read_corpus recognises MMC4 rows by their text_list


def test_obelics_rows_without_id_get_a_stable_one(tmp_path):
    row = {
        "texts": ["Some text.", None],
        "images": [None, "http://e.org/a.jpg"],
        "metadata": json.dumps([None, {"src": "a.jpg", "alt_text": "", "original_width": 300}]),
        "general_metadata": json.dumps(
            {"url": "http://e.org/", "warc_filename": "x.warc.gz", "warc_record_offset": 7}
        ),
    }
    path = tmp_path / "obelics.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    a, b = list(F.read_corpus(path))
    assert a == b and len(a.id) == 40 and a.metadata[1]["original_width"] == 300
