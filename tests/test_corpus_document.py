"""Document layout checks, canonical rows, and step accounting (in = out + excluded + errors)."""

from __future__ import annotations

import json

import pytest

from interleaf.corpus.base import Drop, Step, StepStats, run_steps
from interleaf.corpus.document import Document
from interleaf.errors import InputError


def _doc() -> Document:
    d = Document(general_metadata={"id": "d1", "url": "http://e.org/a", "filter_scores": {"q": 0.5}})
    d.add_text("Intro paragraph.\n\nSecond paragraph.")
    d.add_image("http://e.org/a.jpg", {"alt_text": "A", "width": 200, "height": None})
    d.add_text("After the image.")
    d.add_image("http://e.org/b.jpg")
    return d


def test_accessors_and_row_round_trip():
    d = _doc().validate()
    assert d.n_images == 2 and d.n_texts == 2 and len(d) == 4 and d.id == "d1" and d.url == "http://e.org/a"
    assert d.text == "Intro paragraph.\n\nSecond paragraph.\n\nAfter the image."
    assert d.metadata[1]["url"] == "http://e.org/a.jpg"  # add_image records the resolved URL
    row = d.to_row()
    assert json.loads(json.dumps(row)) == row  # JSON-able
    assert Document.from_row(row) == d
    # OBELICS rows carry metadata / general_metadata as JSON strings
    obelics = dict(
        row, metadata=json.dumps(row["metadata"]), general_metadata=json.dumps(row["general_metadata"])
    )
    assert Document.from_row(obelics) == d
    # OmniCorpus struct columns give all-null structs at text positions and may lack image metadata
    omni = dict(row, metadata=[{"url": None, "alt_text": None}, row["metadata"][1], {"url": None}, None])
    back = Document.from_row(omni)
    assert (
        back.metadata[0] is None
        and back.metadata[2] is None
        and back.metadata[3] == {"url": "http://e.org/b.jpg"}
    )


@pytest.mark.parametrize(
    "row, field",
    [
        ({"images": []}, "texts"),
        ({"texts": ["a"], "images": [None, None]}, "texts"),
        ({"texts": ["a", None], "images": ["x", None]}, "position 0"),
        ({"texts": [None], "images": [None]}, "position 0"),
        ({"texts": [3], "images": [None]}, "texts[0]"),
        ({"texts": [None], "images": [7], "metadata": [{}]}, "images[0]"),
        ({"texts": ["a"], "images": [None], "metadata": "{not json"}, "metadata"),
        ({"texts": ["a"], "images": [None], "general_metadata": "[1, 2]"}, "general_metadata"),
        ({"texts": ["a"], "images": [None], "general_metadata": {"filter_scores": 3}}, "filter_scores"),
        ({"texts": "abc", "images": [None]}, "texts"),
    ],
)
def test_bad_rows_name_the_field(row, field):
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Document.from_row(row)


def test_select_and_copy_are_independent():
    d = _doc()
    c = d.copy()
    c.metadata[1]["alt_text"] = "changed"
    assert d.metadata[1]["alt_text"] == "A"
    s = d.select([True, False, True, False])
    assert s.texts == ["Intro paragraph.\n\nSecond paragraph.", "After the image."] and s.n_images == 0


class _RemoveFirstImage(Step):
    name = "remove_first_image"

    def process(self, doc):
        first = next(i for i, x in enumerate(doc.images) if x is not None)
        self.remove_image("first")
        out = doc.select([i != first for i in range(len(doc))])
        if out.n_images == 0:
            return Drop("no_images_left")
        return out


class _Boom(Step):
    name = "boom"

    def process(self, doc):
        raise RuntimeError("bad document")


def test_step_accounting_balances():
    step = _RemoveFirstImage()
    one_image = Document(
        texts=["t", None], images=[None, "http://e.org/x.jpg"], metadata=[None, {"url": "x"}]
    )
    outs = [step(_doc()), step(one_image), step(_doc())]
    assert isinstance(outs[0], Document) and outs[1] == Drop("no_images_left")
    st = step.stats
    assert (st.docs_in, st.docs_out, st.excluded) == (3, 2, 1)
    assert (st.images_in, st.images_out, st.images_in_dropped_docs) == (5, 2, 1)
    assert st.images_removed_by_reason == {"first": 2}  # the dropped document's removal is not double counted
    assert st.balanced()
    boom = _Boom()
    res = run_steps(_doc(), [step, boom, _RemoveFirstImage()])
    assert res.error and res.reason == "boom:RuntimeError" and "bad document" in res.detail
    assert boom.stats.errors_by_reason == {"boom:RuntimeError": 1} and boom.stats.balanced()


def test_stats_merge_and_dict_round_trip():
    a = StepStats(name="s", docs_in=3, docs_out=1, images_in=4, images_out=1, images_in_dropped_docs=2)
    a.excluded_by_reason["x"] += 1
    a.errors_by_reason["e"] += 1
    a.images_removed_by_reason["small"] += 1
    b = StepStats.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b == StepStats.from_dict(a.to_dict()) and b.to_dict() == a.to_dict()
    assert b.balanced()
    b.merge(a)
    assert b.docs_in == 6 and b.excluded_by_reason == {"x": 2} and b.images_removed_by_reason == {"small": 2}
    assert b.balanced() and b.to_dict()["excluded"] == 2


class _SilentImageDrop(Step):
    name = "silent"

    def process(self, doc):
        return doc.select([x is None for x in doc.images])  # removes images without remove_image()


def test_unrecorded_image_removals_are_still_counted():
    step = _SilentImageDrop()
    out = step(_doc())
    assert (
        out.n_images == 0 and step.stats.images_removed_by_reason == {"silent": 2} and step.stats.balanced()
    )


def _scored() -> list[Document]:
    """Documents carrying the scores the filters record (ints and rounded floats, flat keys)."""
    from interleaf.corpus import filters as F

    words = "the river and the mountain of a village with the garden to have that".split()
    text = " ".join(words[i % len(words)] + ("." if i % 11 == 10 else "") for i in range(120)) + "."
    docs = []
    for k in range(3):
        d = _doc()
        d.general_metadata = {"id": f"d{k}", "url": f"http://e.org/{k}"}
        d.texts[0] = text
        # struct columns need one metadata schema (a key missing from one image reads back as None)
        d.metadata[3] = {"url": d.images[3], "alt_text": None, "width": None, "height": None}
        out = run_steps(d, [F.GopherQuality(), F.FineWebQuality(), F.ImageTextRatio()])
        assert isinstance(out, Document), out
        docs.append(out)
    scores = docs[0].general_metadata["filter_scores"]
    assert scores["gopher_quality.words"] == 123 and 0 < scores["fineweb_quality.list_ratio"] < 0.3
    return docs


@pytest.mark.parametrize(
    "how", ["parquet-obelics", "parquet-omnicorpus", "jsonl-canonical", "jsonl-obelics", "mmc4"]
)
def test_filter_scores_round_trip_every_format(tmp_path, how):
    from interleaf.corpus import formats as F

    docs = _scored()
    kind, layout = how.split("-") if "-" in how else ("mmc4", None)
    if kind == "parquet":
        F.write_parquet(tmp_path / "x.parquet", docs, layout=layout)
        back = list(F.read_corpus(tmp_path / "x.parquet"))
    elif kind == "jsonl":
        F.write_jsonl(tmp_path / "x.jsonl", docs, layout=layout)
        back = list(F.read_corpus(tmp_path / "x.jsonl"))
    else:
        F.write_jsonl(tmp_path / "x.jsonl", docs, layout="mmc4")
        back = list(F.read_corpus(tmp_path / "x.jsonl"))
        assert [F.from_mmc4(F.to_mmc4(d)) for d in docs] == docs
    assert back == docs
    assert back[0].general_metadata["filter_scores"] == docs[0].general_metadata["filter_scores"]


def test_copy_does_not_share_filter_scores():
    from interleaf.corpus import filters as F

    d = _scored()[0]
    c = d.copy()
    F.record_scores(c, "again", {"x": 1})
    assert "again.x" in c.general_metadata["filter_scores"]
    assert "again.x" not in d.general_metadata["filter_scores"]
