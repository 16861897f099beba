"""Rule filters: decisions against datatrove's reference implementation, thresholds at the boundary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import interleaf
from interleaf.corpus import filters as F
from interleaf.corpus.base import Drop, RawPage, run_steps
from interleaf.corpus.document import Document
from interleaf.errors import ConfigError

SAMPLE = Path(interleaf.__file__).parent / "data" / "corpus" / "sample.warc.gz"
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which but "
    "river mountain garden library window morning question answer history science music market bridge "
    "winter summer animal forest ocean village teacher student journey picture language kitchen doctor"
).split()


def _doc(*nodes) -> Document:
    """Nodes: strings are text nodes, ('img', url, meta) tuples are images."""
    d = Document(general_metadata={"id": "t", "url": "http://example.org/a"})
    for n in nodes:
        if isinstance(n, tuple):
            d.add_image(n[1], n[2] if len(n) > 2 else {})
        else:
            d.add_text(n)
    return d


def _prose(rng: random.Random, n_words: int, sentence_len: int = 12) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % sentence_len == 0 else w)
        if i % sentence_len == sentence_len - 1:
            out[-1] += "."
    return " ".join(out) + ("" if out[-1].endswith(".") else ".")


@pytest.fixture(scope="module")
def real_docs() -> list[Document]:
    """Documents extracted from the embedded sample WARC (the libxslt manual, not written by us)."""
    from interleaf.corpus.extract import extract
    from interleaf.corpus.warc import read_warc

    docs = []
    for p in read_warc(SAMPLE):
        if isinstance(p, RawPage):
            d = extract(p, drop_no_images=False)
            if isinstance(d, Document):
                docs.append(d)
    assert len(docs) > 40
    return docs


def _corpus_texts(real_docs) -> list[str]:
    rng = random.Random(0)
    texts = [d.text for d in real_docs]
    # crafted variants that hit every rule family
    texts += [_prose(rng, n) for n in (30, 49, 50, 51, 200, 800)]
    base = _prose(rng, 300)
    texts += [
        base + "\nLorem ipsum dolor sit amet, consectetur.",
        base + "\nvar x = {a: 1};",
        "\n".join([base[:200]] * 6),
        "\n\n".join(["- item one two three"] * 40),
        "\n".join(f"line {i} ..." for i in range(60)),
        base.replace(" ", " # ", 40),
        ("word " * 60).strip(),
        "\n".join(base.split(". ")),
        base + "\nThis site uses cookies to improve things.\nEnable JavaScript to view the page now.",
        "12345 67890 " * 40 + base[:300],
    ]
    return texts


# ---------------------------------------------------------------------------------------------
# reference comparison with datatrove (same tokeniser, so the rule logic is what is compared)
def _patch_datatrove(monkeypatch):
    pytest.importorskip("datatrove")
    import datatrove.pipeline.filters.c4_filters as c4
    import datatrove.pipeline.filters.fineweb_quality_filter as fw
    import datatrove.pipeline.filters.gopher_quality_filter as gq
    import datatrove.pipeline.filters.gopher_repetition_filter as gr

    def split_words(text, language=None):
        return F.words(text)

    def split_sentences(text, language=None):
        return ["s"] * F.count_sentences(text)

    for mod in (gq, gr, fw):
        monkeypatch.setattr(mod, "split_into_words", split_words)
    monkeypatch.setattr(c4, "split_into_sentences", split_sentences)
    monkeypatch.setattr(fw, "TERMINAL_PUNCTUATION", set(F._FW_TERMINAL))
    return gq, gr, c4, fw


def _dt_keep(flt, text: str) -> bool:
    from datatrove.data import Document as DTDocument

    res = flt.filter(DTDocument(text=text, id="x"))
    return res is True or (isinstance(res, tuple) and res[0])


@pytest.mark.parametrize("name", ["gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"])
def test_decisions_match_datatrove(name, real_docs, monkeypatch):
    gq, gr, c4, fw = _patch_datatrove(monkeypatch)
    ref = {
        "gopher_quality": gq.GopherQualityFilter,
        "gopher_repetition": gr.GopherRepetitionFilter,
        "c4_quality": c4.C4QualityFilter,
        "fineweb_quality": lambda: fw.FineWebQualityFilter(stop_chars=F._FW_TERMINAL),
    }[name]()
    ours = F.FILTERS[name]()
    texts = _corpus_texts(real_docs)
    kept = dropped = 0
    for text in texts:
        expect = _dt_keep(ref, text)
        got = not isinstance(ours(_doc(text)), Drop)
        assert got == expect, (name, text[:300])
        kept += got
        dropped += not got
    assert kept and dropped  # the set exercises both outcomes
    assert ours.stats.balanced() and ours.stats.docs_in == len(texts)


def test_c4_line_removal_matches_datatrove_text(real_docs, monkeypatch):
    _, _, c4, _ = _patch_datatrove(monkeypatch)
    from datatrove.data import Document as DTDocument

    ref = c4.C4QualityFilter(filter_no_terminal_punct=False, filter_curly_bracket=False)
    ours = F.C4Quality(filter_no_terminal_punct=False, filter_curly_bracket=False)
    compared = 0
    for d in real_docs:
        text = "\n".join(ln for ln in d.text.split("\n") if ln.strip())  # no blank lines: same joins
        dt = DTDocument(text=text, id="x")
        res = ref.filter(dt)
        out = ours(_doc(text))
        if res is True:
            assert not isinstance(out, Drop)
            assert out.text == dt.text
            compared += 1
        else:
            assert isinstance(out, Drop)
    assert compared > 5


# ---------------------------------------------------------------------------------------------
# boundaries
def test_gopher_word_count_boundary():
    rng = random.Random(1)
    f = F.GopherQuality()
    assert isinstance(f(_doc(_prose(rng, 49))), Drop)
    assert not isinstance(f(_doc(_prose(rng, 50))), Drop)
    assert f.stats.excluded_by_reason == {"gopher_short_doc": 1}
    assert isinstance(F.GopherQuality(min_doc_words=60)(_doc(_prose(rng, 55))), Drop)


def test_gopher_stop_words_and_hash_ratio():
    rng = random.Random(2)
    text = " ".join(rng.choice(["river", "mountain", "garden", "window"]) for _ in range(80))
    assert F.GopherQuality()(_doc(text)).reason == "gopher_enough_stop_words"
    ok = _prose(rng, 100)
    n = len(F.words(ok))
    assert not isinstance(F.GopherQuality()(_doc(ok + " #" * (n // 10 - 1))), Drop)
    assert F.GopherQuality()(_doc(ok + " #" * (n // 5))).reason == "gopher_too_many_hashes"


def test_gopher_repetition_duplicate_lines():
    rng = random.Random(3)
    lines = [_prose(rng, 10) for _ in range(10)]
    # 3 duplicates of 10 lines is 0.3 (kept: the rule is "> 0.3"), 4 of 11 is > 0.3
    f = F.GopherRepetition(dup_line_char_frac=None, dup_para_char_frac=None, top_n_grams=[], dup_n_grams=[])
    assert not isinstance(f(_doc("\n".join(lines[:7] + lines[:3]))), Drop)
    assert f(_doc("\n".join(lines[:7] + lines[:4]))).reason == "dup_line_frac"


def test_c4_edits_lines_inside_text_nodes_and_keeps_images():
    rng = random.Random(4)
    p1 = _prose(rng, 40)
    d = _doc(p1 + "\nShort line", ("img", "http://example.org/a.jpg"), "Menu\n\n" + _prose(rng, 40))
    out = F.C4Quality()(d)
    assert not isinstance(out, Drop)
    assert out.images == [None, "http://example.org/a.jpg", None]
    assert "Short line" not in out.text and "Menu" not in out.text
    assert F.C4Quality()(_doc(p1 + "\nLorem ipsum dolor sit amet etc.")).reason == "lorem_ipsum"
    assert F.C4Quality()(_doc("One sentence here. Two sentences here.")).reason == "too_few_sentences"


def test_fineweb_line_punct_boundary():
    f = F.FineWebQuality(short_line_thr=1.0, char_duplicates_ratio=1.0, new_line_ratio=10)
    lines = [f"this is line number {i} of the text" for i in range(100)]
    ok = list(lines)
    for i in range(12):
        ok[i] += "."
    assert not isinstance(f(_doc("\n".join(ok))), Drop)  # 12/100 = 0.12 passes
    ok[11] = lines[11]
    assert f(_doc("\n".join(ok))).reason == "line_punct_ratio"


def test_image_nodes_rules_at_the_boundary():
    f = F.ImageNodes()
    meta = lambda w, h: {"width": w, "height": h}  # noqa: E731
    d = _doc(
        "intro text",
        ("img", "http://e.org/a.jpg", meta(150, 150)),  # kept: 150 is inside [150, 20000]
        ("img", "http://e.org/b.jpg", meta(149, 200)),  # size
        ("img", "http://e.org/c.jpg", meta(300, 150)),  # aspect 2.0 kept
        ("img", "http://e.org/d.jpg", meta(301, 150)),  # aspect > 2
        ("img", "http://e.org/site-logo.png", {}),  # ban word
        ("img", "http://e.org/anim.gif", {}),  # format
        ("img", "http://e.org/photo?id=3", {}),  # unknown format and size: kept
        (
            "img",
            "http://e.org/e.jpg",
            {"real_width": 20001, "real_height": 15000, "width": 200},
        ),  # fetched size wins
        "outro text",
    )
    out = f(d)
    assert out.image_urls == ["http://e.org/a.jpg", "http://e.org/c.jpg", "http://e.org/photo?id=3"]
    assert out.texts[0] == "intro text" and out.texts[-1] == "outro text"
    assert f.stats.images_removed_by_reason == {
        "image_size": 2,
        "image_aspect_ratio": 1,
        "image_url_ban_word": 1,
        "image_format": 1,
    }
    assert f.stats.balanced()
    # all images removed: the document goes (OmniCorpus keeps only documents with images)
    lone = _doc("text", ("img", "http://e.org/icon.png"), "more")
    assert f(lone).reason == "no_images_left"
    assert f.stats.images_in_dropped_docs == 1 and f.stats.balanced()
    kept = F.ImageNodes(drop_if_no_images=False)(lone)
    assert kept.texts == ["text\n\nmore"] and kept.images == [None]  # neighbours merged


def test_image_text_ratio_boundary():
    rng = random.Random(5)
    f = F.ImageTextRatio()
    imgs = [("img", f"http://e.org/{i}.jpg") for i in range(3)]
    assert not isinstance(f(_doc(_prose(rng, 150), *imgs)), Drop)  # 150 words / 3 images = 50
    assert f(_doc(_prose(rng, 149), *imgs)).reason == "low_words_per_image"
    assert not isinstance(f(_doc(_prose(rng, 10), *imgs[:2])), Drop)  # <= 2 images: no ratio
    assert f(_doc(_prose(rng, 100))).reason == "too_few_images"
    assert (
        f(_doc(_prose(rng, 5000), *[("img", f"http://e.org/{i}.jpg") for i in range(31)])).reason
        == "too_many_images"
    )


def test_char_repetition_matches_substring_counting():
    import math
    from collections import Counter

    def reference(text, n):  # the definition, with Python substrings
        counts = sorted(Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
        k = min(int(math.sqrt(len(counts))), len(counts) - sum(1 for c in counts if c == 1))
        return sum(counts[:k]) / sum(counts)

    rng = random.Random(8)
    for _ in range(20):
        text = _prose(rng, rng.randrange(3, 80)) * rng.randrange(1, 4) + "é€😀"
        assert F.char_repetition_ratio(text, 10) == pytest.approx(reference(text, 10))


def test_obelics_measures():
    assert F.char_repetition_ratio("abcdefghijk", 10) == 0.0
    # two distinct 10-grams (46 and 45 times): the top sqrt(2) -> 1 of them counts
    assert F.char_repetition_ratio("ab" * 50, 10) == pytest.approx(46 / 91)
    ws = F.obelics_words("The cat sat. The cat sat. The cat sat on it")
    assert ws[:3] == ["the", "cat", "sat"]
    assert F.word_repetition_ratio(ws, 3) == pytest.approx(7 / 9)  # 9 trigrams, 2 of them single
    assert F.special_character_ratio("a1!") == pytest.approx(2 / 3)
    assert F.punctuation_ratio("one two three", min_tokens=12) == 1.0
    assert F.punctuation_ratio("one, two.") == pytest.approx(2 / 4)


def test_obelics_paragraph_and_document():
    rng = random.Random(6)
    good = _prose(rng, 60)
    d = _doc(
        good + "\n\n" + "Buy now" + "\n\n" + "123 456 789 000 111 222 333 444 555",
        ("img", "http://e.org/a.jpg"),
    )
    out = F.ObelicsParagraph()(d)
    assert out.texts[0] == good and out.images[1] == "http://e.org/a.jpg"
    assert not isinstance(F.ObelicsDocument()(out), Drop)
    assert F.ObelicsDocument()(_doc(good)).reason == "obelics_document_image_count"
    assert F.ObelicsDocument(min_words=100)(out).reason == "obelics_document_word_count"


def test_omnicorpus_english_rules():
    rng = random.Random(7)
    body = [_prose(rng, 40) for _ in range(4)]
    noise = [
        "Click here to sign up and read more",  # short + sign-in phrase
        "Published by the City Desk team for our readers today",  # source credit
        "1,234 likes",  # social counter
        "Advertisement",
        "Posted by admin on the site",  # <= 10 words ... "by" only counts at the start
        "Call us at 555-123-4567 for details about the new homes and offers",  # phone number
        "By John Smith and Jane Doe",  # byline
        "Things to do in the city this weekend with friends and family",
        "Getty image",  # caption next to the image
        "Updated on March 3, 2021 at 10:30 am by staff",  # date/time
    ]
    d = _doc(
        "\n\n".join([body[0], noise[0], noise[1], body[1], noise[2], noise[8]]),
        ("img", "http://e.org/x.jpg"),
        "\n\n".join([noise[3], body[2], noise[5], noise[6], noise[7], noise[9], body[3]]),
    )
    out = F.OmniCorpusEnglish()(d)
    assert not isinstance(out, Drop)
    paras = [p for t in out.texts if t is not None for p in t.split("\n\n")]
    assert paras == body
    assert out.images == [None, "http://e.org/x.jpg", None]
    # upper-case and digit-heavy paragraphs go, unless an image is within 10 lines
    shout = "SHOCKING NEWS FROM THE CITY TODAY EVERYONE SHOULD READ"
    far = _doc("\n\n".join([body[0], shout, body[1], body[2], body[3]]))
    assert shout not in F.OmniCorpusEnglish(min_doc_words=10)(far).text
    near = _doc("\n\n".join([body[0], shout]), ("img", "http://e.org/x.jpg"), "\n\n".join(body[1:]))
    assert shout in F.OmniCorpusEnglish(min_doc_words=10)(near).text
    # numbered references at the end and their marks in the text
    refs = _doc(
        body[0] + " [1]", body[1], "[1] A. Author. A book about rivers. 2001.", ("img", "http://e.org/r.jpg")
    )
    out = F.OmniCorpusEnglish(min_doc_words=10)(refs)
    assert out.texts[0] == body[0] and "[1]" not in out.text
    # incomplete sentences at the edges of the document are trimmed
    edges = _doc("A story of the river towns today", body[0], body[1] + " And then the river")
    out = F.OmniCorpusEnglish(min_doc_words=10)(edges)
    assert out.text == body[0] + "\n\n" + body[1]
    # document rules: short documents and image-heavy documents
    assert F.OmniCorpusEnglish()(_doc(_prose(rng, 30))).reason == "omnicorpus_word_count"
    many = _doc(_prose(rng, 120), *[("img", f"http://e.org/{i}.jpg") for i in range(3)])
    assert F.OmniCorpusEnglish()(many).reason == "omnicorpus_image_text_ratio"
    f = F.OmniCorpusEnglish()
    out = f(_doc(_prose(rng, 160), ("img", "http://e.org/page.html"), ("img", "http://e.org/p.jpg")))
    assert out.image_urls == ["http://e.org/p.jpg"]  # an image "src" that is a web page is no image
    assert f.stats.images_removed_by_reason == {"omnicorpus_bad_image_src": 1} and f.stats.balanced()


def test_registry_config_and_defaults(real_docs):
    assert set(F.FILTERS) >= {
        "gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality", "omnicorpus_en",
        "obelics_paragraph", "obelics_document", "image_nodes", "image_text_ratio",
    }  # fmt: skip
    steps = F.build_filters([{"gopher_quality": {"min_doc_words": 10}}, "image_nodes"])
    assert steps[0].min_doc_words == 10 and steps[0].config()["min_doc_words"] == 10
    with pytest.raises(ConfigError, match="filters.gopher_qualty"):
        F.build_filters(["gopher_qualty"])
    with pytest.raises(ConfigError, match="filters.gopher_quality"):
        F.build_filters([{"gopher_quality": {"min_words": 3}}])
    # the default list on the real sample keeps something with images, and accounts for everything
    steps = F.build_filters(None)
    kept = [r for d in real_docs for r in [run_steps(d.copy(), steps)] if not isinstance(r, Drop)]
    assert kept and all(r.n_images > 0 for r in kept)
    for s in steps:
        assert s.stats.balanced(), s.name


def test_every_filter_survives_odd_documents():
    odd = [
        _doc(("img", "http://e.org/a.jpg")),
        _doc(""),
        _doc("\n\n\n"),
        _doc("?!?! ... ###"),
        _doc("x" * 5000),
    ]
    for name, cls in F.FILTERS.items():
        f = cls()
        for d in odd:
            out = f(d)
            assert isinstance(out, (Document, Drop)), name
            if isinstance(out, Drop):
                assert not out.error, (name, out)
        assert f.stats.balanced() and f.stats.docs_in == len(odd)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"gopher_quality": {"min_doc_words": "x"}},
            "gopher_quality: option 'min_doc_words' must be an integer",
        ),
        ({"gopher_quality": {"max_symbol_word_ratio": True}}, "'max_symbol_word_ratio' must be a number"),
        ({"c4_quality": {"filter_curly_bracket": 1}}, "'filter_curly_bracket' must be true or false"),
        ({"gopher_repetition": {"top_n_grams": [[2, "x"]]}}, "'top_n_grams' must be a list of"),
        ({"omnicorpus_en": {"flagged_words": "sex"}}, "'flagged_words' must be a list of strings or null"),
        ({"fineweb_quality": {"min_words": 3}}, "fineweb_quality: unknown option 'min_words' \\(known: "),
    ],
)
def test_filter_option_types_are_checked_when_built(spec, message):
    from interleaf.corpus import pipeline as P

    with pytest.raises(ConfigError, match=message) as exc:
        F.build_filters([spec])
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=message):  # the pipeline's config path says the same
        P.build_filters(P.load_config({"filters": [spec]}))


def test_filter_options_of_the_right_type_are_accepted():
    steps = F.build_filters(
        [
            {"gopher_quality": {"min_avg_word_length": 2, "max_doc_words": None, "stop_words": ["a", "b"]}},
            {"gopher_repetition": {"top_n_grams": [[2, 0.3]], "dup_n_grams": []}},
            {"image_nodes": {"valid_formats": None, "min_aspect_ratio": 1}},
            {"image_text_ratio": {"max_images": None}},
        ]
    )
    assert steps[0].min_avg_word_length == 2 and steps[1].top_n_grams == [(2, 0.3)]
    # every filter accepts its own defaults
    import inspect

    for name, cls in F.FILTERS.items():
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if k != "self"}
        F.check_options(name, cls, {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()})


def test_filters_record_what_they_measured(real_docs):
    rng = random.Random(5)
    prose = "\n\n".join(_prose(rng, 80) for _ in range(4))
    doc = _doc(prose, ("img", "http://e.org/a.jpg", {"width": 300, "height": 200}), _prose(rng, 60))
    steps = [cls() for cls in F.FILTERS.values()]
    out = run_steps(doc, [s for s in steps if s.name != "c4_paragraph"])
    assert isinstance(out, Document), out
    fs = out.general_metadata["filter_scores"]
    text = doc.text
    ws = [w for w in F.words(text) if w[:1].isalnum()]
    # gopher_quality: exactly the quantities compared with its thresholds
    assert fs["gopher_quality.words"] == len(ws)
    assert fs["gopher_quality.mean_word_length"] == round(sum(map(len, ws)) / len(ws), 4)
    assert {k.split(".", 1)[1] for k in fs if k.startswith("gopher_quality.")} == {
        "words", "mean_word_length", "hash_ratio", "ellipsis_ratio", "bullet_lines_ratio",
        "ellipsis_lines_ratio", "alpha_words_ratio", "stop_words",
    }  # fmt: skip
    assert fs["gopher_repetition.top_2_gram"] <= 0.2 and "gopher_repetition.duplicated_10_n_grams" in fs
    assert fs["c4_quality.lines"] >= fs["c4_quality.lines_removed"] >= 0 and fs["c4_quality.sentences"] >= 5
    for k in ("line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"):
        assert 0 <= fs[f"fineweb_quality.{k}"] <= 1, k
    assert fs["omnicorpus_en.stop_words"] >= 2 and fs["omnicorpus_en.max_paragraph_words"] >= 35
    assert fs["obelics_paragraph.paragraphs"] >= fs["obelics_paragraph.paragraphs_removed"]
    assert fs["obelics_document.images"] == 1 and 0 < fs["obelics_document.stopword_ratio"] < 1
    assert fs["image_nodes.images"] == 1 and fs["image_nodes.images_removed"] == 0
    assert fs["image_text_ratio.images"] == 1
    # JSON-friendly: plain ints and floats rounded to 4 decimals
    for k, v in fs.items():
        assert type(v) in (int, float) and (type(v) is int or round(v, 4) == v), (k, v)
    # a dropped document carries the scores up to the failing rule (full exclusion records)
    short = _doc(_prose(rng, 30))
    assert F.GopherQuality()(short).reason == "gopher_short_doc"
    assert short.general_metadata["filter_scores"] == {"gopher_quality.words": 30}
    # the default list on real pages: every kept document has the scores of every step
    steps = F.build_filters(None)
    kept = [r for d in real_docs for r in [run_steps(d.copy(), steps)] if not isinstance(r, Drop)]
    for r in kept:
        names = {k.split(".", 1)[0] for k in r.general_metadata["filter_scores"]}
        assert names == {s.name for s in steps}, names
    assert all(
        "filter_scores" not in d.general_metadata or not d.general_metadata["filter_scores"]
        for d in real_docs
    )


def test_default_c4_step_is_fineweb_published_setting():
    """The default C4 step is datatrove's C4QualityFilter as FineWeb ran it: its own defaults with
    filter_no_terminal_punct=False (the curly-bracket rule stays on)."""
    import inspect

    from datatrove.pipeline.filters.c4_filters import C4QualityFilter

    (c4,) = [s for s in F.build_filters(None) if isinstance(s, F.C4Quality)]
    published = {
        name: p.default
        for name, p in inspect.signature(C4QualityFilter.__init__).parameters.items()
        if hasattr(c4, name)
    }
    published["filter_no_terminal_punct"] = False
    assert len(published) >= 8
    assert {name: getattr(c4, name) for name in published} == published
