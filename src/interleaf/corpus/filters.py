"""Rule-based filters for interleaved documents, each a configurable ``Step`` with published defaults.

Document-level text rules look at the pure-text view ``doc.text`` (text nodes joined by blank
lines; images excluded, as the OmniCorpus English rules do). Line- and paragraph-level rules edit
text nodes in place and keep every image where it stood; a text node left empty disappears.
Image rules remove image nodes (counted per reason in ``stats.images_removed_by_reason``).
Each filter records the quantities it compared with its thresholds in
``general_metadata['filter_scores']`` as ``'<filter>.<quantity>'`` (``record_scores``), on the
documents it keeps and, up to the failing rule, on those it drops.

Sources of the defaults (thresholds are constructor keyword arguments, so a YAML config can set
any of them; ``FILTERS`` maps config names to classes):

- ``gopher_quality``, ``gopher_repetition``: Gopher (Rae et al. 2021, Table A1) as implemented by
  datatrove's ``GopherQualityFilter`` / ``GopherRepetitionFilter`` defaults.
- ``c4_quality``: C4 (Raffel et al. 2020) line rules as in datatrove's ``C4QualityFilter``;
  ``c4_paragraph``: mC4's paragraph rule (datatrove ``C4ParagraphFilter``).
- ``fineweb_quality``: FineWeb (Penedo et al. 2024), datatrove ``FineWebQualityFilter``.
- ``omnicorpus_en``: the English human-feedback rules released with OmniCorpus
  (``human_feedback_textfiltering``; paper App. and Table 11), main paragraph and document rules.
- ``obelics_paragraph`` / ``obelics_document``: OBELICS ``config_filter_web_documents.yaml``
  node- and document-level text rules. The FastText language-id and KenLM perplexity rules are
  OFF (they need model files); common-word and flagged-word rules run only when a word list is
  given (``common_words=``, ``flagged_words=``; OBELICS ships them separately).
- ``image_nodes``: image-node rules: formats (OBELICS jpg/jpeg/png/webp; MMC4 png/jpg/jpeg),
  sides in [150, 20000] px, aspect ratio in [0.5, 2] (MMC4, OBELICS, OmniCorpus), URL ban words
  logo/button/icon/plugin/widget (MMC4) + porn/xxx/sex (OBELICS).
- ``image_text_ratio``: OmniCorpus ``img_txt_ratio_discard`` (more than 2 images and fewer than 50
  words per image) and OBELICS' image count range [1, 30].

Words are tokenised with one compiled regex (``words``) rather than NLTK (whose Punkt data is a
download); sentence counts use a punctuation regex (``count_sentences``). Both are documented
approximations of datatrove's defaults; the rule logic is the same (tests compare decisions with
datatrove given the same tokeniser).
"""

from __future__ import annotations

import inspect
import math
import re
import string
import types
import typing
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np

from interleaf.corpus.base import Drop, Step
from interleaf.corpus.document import Document
from interleaf.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# shared text helpers
# ---------------------------------------------------------------------------------------------
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_SENT_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
# punctuation used to strip words (ASCII + typographic + CJK full-width marks)
PUNCTUATION = string.punctuation + "…“”‘’«»‹›—–―•·、。，；：！？（）【】「」《》〈〉～％＃＆＊"
# OBELICS-style special characters: punctuation, digits, whitespace and frequent symbols
SPECIAL_CHARACTERS = (
    PUNCTUATION + string.digits + string.whitespace + "\u00a0\u200b\ufffd©®™°§¶×÷±€£¥¢¤★☆●■◆►▼▲→←↑↓✓♥"
)
_SPECIAL_DELETE = str.maketrans("", "", SPECIAL_CHARACTERS)
# English function words (our list; OBELICS uses a longer published list of the same kind)
STOPWORDS_EN = frozenset(
    """a about above across after afterwards again against ago ahead all almost along alongside already
    also although always am among amongst an and another any anybody anyone anything anyway are around
    as aside at away back be became because become becomes been before behind being below beneath beside
    besides between beyond both but by can cannot could did do does doing done down due during each
    either else even ever every everybody everyone everything except few for from further get gets
    getting got had has have having he her here hers herself him himself his how however i if in
    including inside instead into is it it's its itself just least less like made many may me might
    mine more most much must my myself near nearly neither never next no nobody none nor not nothing
    now of off often on once one only onto or other others otherwise our ours ourselves out outside
    over own per perhaps plus quite rather same several shall she should since so some somebody
    someone something sometimes such than that the their theirs them themselves then there therefore
    these they this those though through throughout thus till to together too toward towards under
    underneath unless unlike until up upon us use used very via was we well were what whatever when
    whenever where whereas wherever whether which while who whoever whom whose why will with within
    without would yet you your yours yourself yourselves""".split()
)


@lru_cache(maxsize=2)  # the filters of one document share it; big pages are not kept around
def words(text: str) -> list[str]:
    """Word tokens: runs of word characters (with inner apostrophes) and runs of punctuation."""
    return _WORD_RE.findall(text)


def count_sentences(text: str) -> int:
    """Sentences in ``text``: terminal-punctuation runs, plus one for trailing unterminated text."""
    text = text.strip()
    if not text:
        return 0
    ends = list(_SENT_END.finditer(text))
    n = len(ends)
    if not ends or ends[-1].end() < len(text):
        n += 1
    return n


@lru_cache(maxsize=2)  # the filters of one document share it; big pages are not kept around
def obelics_words(text: str) -> list[str]:
    """OBELICS word list: whitespace split, lower-cased, special characters stripped, empties dropped."""
    out = []
    for w in text.lower().split():
        w = w.strip(SPECIAL_CHARACTERS)
        if w:
            out.append(w)
    return out


def _ngram_counts(seq: list[str], n: int) -> Counter:
    return Counter(zip(*(seq[i:] for i in range(n))))


def _paragraphs(text: str) -> list[str]:
    return text.split("\n\n")


def record_scores(doc: Document, step: str, scores: dict[str, float]) -> None:
    """Store a step's measured quantities in ``general_metadata['filter_scores']``.

    Keys are ``'<step>.<quantity>'`` (``'gopher_quality.mean_word_length'``): one flat mapping of
    numbers, as the OmniCorpus Parquet layout stores it (``map<string, float64>``). Counts stay
    ints, ratios are rounded to 4 decimals (JSON-friendly, and enough to re-check a threshold).
    """
    if not scores:
        return
    gm = doc.general_metadata
    out = gm.get("filter_scores")
    if not isinstance(out, dict):
        out = gm["filter_scores"] = {}
    for k, v in scores.items():
        out[f"{step}.{k}"] = int(v) if isinstance(v, (int, np.integer)) else round(float(v), 4)


class TextStep(Step):
    """A step whose thresholds are keyword arguments; ``config()`` lists them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        for k, v in kwargs.items():
            setattr(self, k, v)

    def _verdict(self, doc: Document, scores: dict, drop: Drop | None = None) -> Document | Drop:
        """``doc`` (or ``drop``) with ``scores`` recorded on ``doc``: a kept document carries the
        quantities its filters measured, and so does a dropped one in a full exclusion record."""
        record_scores(doc, self.name, scores)
        return doc if drop is None else drop


def _edit_paragraphs(doc: Document, keep_fn, image_aware: bool = False) -> Document:
    """Apply ``keep_fn(paragraph, ctx) -> str | None`` to every paragraph of every text node.

    ``ctx`` is a dict with ``near_image`` (the paragraph is the first or last of a text node next to
    an image) when ``image_aware``. Returns a new document; text nodes left empty are removed.
    """
    n = len(doc.texts)
    new_texts: list[str | None] = []
    keep: list[bool] = []
    for i, t in enumerate(doc.texts):
        if t is None:
            new_texts.append(None)
            keep.append(True)
            continue
        paras = _paragraphs(t)
        prev_img = image_aware and i > 0 and doc.images[i - 1] is not None
        next_img = image_aware and i + 1 < n and doc.images[i + 1] is not None
        out = []
        last = len(paras) - 1
        if image_aware and (prev_img or next_img):
            cum = [0]  # lines before paragraph j: cum[j]; lines after it: cum[-1] - cum[j + 1]
            for x in paras:
                cum.append(cum[-1] + x.count("\n") + 1)
        for j, p in enumerate(paras):
            far = 10**9
            ctx = {
                "near_image": (prev_img and j == 0) or (next_img and j == last),
                "after_image": prev_img and j == 0,
                "before_image": next_img and j == last,
                "lines_to_image": min(
                    cum[j] if prev_img else far,
                    cum[-1] - cum[j + 1] if next_img else far,
                )
                if image_aware and (prev_img or next_img)
                else far,
            }
            r = keep_fn(p, ctx)
            if r:
                out.append(r)
        if out:
            new_texts.append("\n\n".join(out))
            keep.append(True)
        else:
            new_texts.append(None)
            keep.append(False)
    res = Document(
        texts=[t for t, k in zip(new_texts, keep) if k],
        images=[x for x, k in zip(doc.images, keep) if k],
        metadata=[m for m, k in zip(doc.metadata, keep) if k],
        general_metadata=doc.general_metadata,
    )
    return res


# ---------------------------------------------------------------------------------------------
# Gopher
# ---------------------------------------------------------------------------------------------
class GopherQuality(TextStep):
    """Gopher quality rules (Rae et al. 2021; datatrove ``GopherQualityFilter`` defaults).

    Drop if: non-symbol words outside [50, 100000]; their mean length outside [3, 10]; '#' or
    ellipsis per word > 0.1; > 90% of lines start with a bullet; > 30% of lines end with an
    ellipsis; < 80% of words contain a letter; < 2 of {the, be, to, of, and, that, have, with}.
    """

    name = "gopher_quality"

    def __init__(
        self,
        min_doc_words: int | None = 50,
        max_doc_words: int | None = 100000,
        min_avg_word_length: float | None = 3,
        max_avg_word_length: float | None = 10,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        max_non_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words: list[str] | None = None,
    ) -> None:
        super().__init__(
            min_doc_words=min_doc_words,
            max_doc_words=max_doc_words,
            min_avg_word_length=min_avg_word_length,
            max_avg_word_length=max_avg_word_length,
            max_symbol_word_ratio=max_symbol_word_ratio,
            max_bullet_lines_ratio=max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=max_non_alpha_words_ratio,
            min_stop_words=min_stop_words,
            stop_words=list(stop_words or ["the", "be", "to", "of", "and", "that", "have", "with"]),
        )
        self._stop = frozenset(self.stop_words)

    def process(self, doc: Document) -> Document | Drop:
        text = doc.text
        ws = words(text)
        n_words = len(ws)
        if n_words == 0:
            return Drop("gopher_short_doc", "no words")
        non_symbol = [w for w in ws if _is_word(w)]
        n = len(non_symbol)
        sc: dict[str, float] = {"words": n}
        if self.min_doc_words and n < self.min_doc_words:
            return self._verdict(doc, sc, Drop("gopher_short_doc", f"{n} words"))
        if self.max_doc_words and n > self.max_doc_words:
            return self._verdict(doc, sc, Drop("gopher_long_doc", f"{n} words"))
        avg = sc["mean_word_length"] = sum(map(len, non_symbol)) / n if n else 0.0
        if self.min_avg_word_length and avg < self.min_avg_word_length:
            return self._verdict(doc, sc, Drop("gopher_below_avg_word_length", f"{avg:.2f}"))
        if self.max_avg_word_length and avg > self.max_avg_word_length:
            return self._verdict(doc, sc, Drop("gopher_above_avg_word_length", f"{avg:.2f}"))
        if self.max_symbol_word_ratio:
            r = sc["hash_ratio"] = text.count("#") / n_words
            if r > self.max_symbol_word_ratio:
                return self._verdict(doc, sc, Drop("gopher_too_many_hashes"))
            r = sc["ellipsis_ratio"] = (text.count("...") + text.count("…")) / n_words
            if r > self.max_symbol_word_ratio:
                return self._verdict(doc, sc, Drop("gopher_too_many_ellipsis"))
        lines = text.splitlines()
        if lines and self.max_bullet_lines_ratio:
            bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
            r = sc["bullet_lines_ratio"] = bullets / len(lines)
            if r > self.max_bullet_lines_ratio:
                return self._verdict(doc, sc, Drop("gopher_too_many_bullets"))
        if lines and self.max_ellipsis_lines_ratio:
            ell = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
            r = sc["ellipsis_lines_ratio"] = ell / len(lines)
            if r > self.max_ellipsis_lines_ratio:
                return self._verdict(doc, sc, Drop("gopher_too_many_end_ellipsis"))
        if self.max_non_alpha_words_ratio:
            alpha = sum(1 for w in ws if w.isalpha() or _has_alpha(w))
            r = sc["alpha_words_ratio"] = alpha / n_words
            if r < self.max_non_alpha_words_ratio:
                return self._verdict(doc, sc, Drop("gopher_below_alpha_threshold", f"{r:.2f}"))
        if self.min_stop_words:
            stop = sc["stop_words"] = len(self._stop.intersection(ws))
            if stop < self.min_stop_words:
                return self._verdict(doc, sc, Drop("gopher_enough_stop_words"))
        return self._verdict(doc, sc)


_ALPHA = re.compile(r"[^\W\d_]")


def _is_word(token: str) -> bool:
    """A token with a letter or digit (not a run of symbols); tokens come from ``words``."""
    return token.strip("_")[:1].isalnum()


def _has_alpha(w: str) -> bool:
    return _ALPHA.search(w) is not None


class _NGramIndex:
    """Word n-grams as 64-bit keys (numpy), for the Gopher repetition measures without per-word Python.

    Key of the n-gram at ``p``: a polynomial combination of the words' string hashes (equal word
    sequences give equal keys; a collision between different sequences has probability ~2^-64).
    """

    _MUL = np.uint64(0x100000001B3)

    def __init__(self, ws: list[str]) -> None:
        self.n_words = len(ws)
        self.hashes = np.fromiter(map(hash, ws), dtype=np.int64, count=len(ws)).view(np.uint64)
        lens = np.fromiter(map(len, ws), dtype=np.int64, count=len(ws))
        self.cum = np.concatenate(([0], np.cumsum(lens)))
        self._keys: dict[int, np.ndarray] = {1: self.hashes}

    def keys(self, n: int) -> np.ndarray:
        if n not in self._keys:
            prev = self.keys(n - 1)
            with np.errstate(over="ignore"):
                self._keys[n] = prev[:-1] * self._MUL ^ self.hashes[n - 1 :]
        return self._keys[n]

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram (its length with spaces x its count).

        Ties go to the n-gram seen first, as ``Counter.most_common`` does.
        """
        k = self.keys(n)
        s = np.sort(k)
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        counts = np.diff(np.concatenate((starts, [len(s)])))
        top = counts.max()
        best = None
        for key in s[starts[counts == top]]:
            first = int(np.argmax(k == key))
            if best is None or first < best:
                best = first
        chars = int(self.cum[best + n] - self.cum[best]) + n - 1
        return chars * int(top)

    def duplicated_chars(self, n: int) -> int:
        """Characters in duplicated n-grams, scanning left to right and jumping over each duplicate
        (datatrove's ``find_all_duplicate``); only positions whose n-gram occurs twice are visited."""
        k = self.keys(n)
        s = np.sort(k)
        dup_keys = s[1:][s[1:] == s[:-1]]
        if len(dup_keys) == 0:
            return 0
        positions = np.flatnonzero(np.isin(k, dup_keys))
        cum = self.cum
        seen: set = set()
        rep = 0
        skip_until = 0
        for p, key in zip(positions.tolist(), k[positions].tolist()):
            if p < skip_until:
                continue
            if key in seen:
                rep += int(cum[p + n] - cum[p])
                skip_until = p + n
            else:
                seen.add(key)
        return rep


class GopherRepetition(TextStep):
    """Gopher repetition rules (Rae et al. 2021, Table A1; datatrove ``GopherRepetitionFilter``).

    Drop if duplicated paragraphs > 30% (or > 20% of characters), duplicated lines > 30% (or > 20%
    of characters), the top 2/3/4-gram covers > 20/18/16% of characters, or duplicated 5..10-grams
    cover > 15/14/13/12/11/10% of characters.
    """

    name = "gopher_repetition"

    def __init__(
        self,
        dup_line_frac: float | None = 0.3,
        dup_para_frac: float | None = 0.3,
        dup_line_char_frac: float | None = 0.2,
        dup_para_char_frac: float | None = 0.2,
        top_n_grams: list[tuple[int, float]] = ((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_n_grams: list[tuple[int, float]] = (
            (5, 0.15),
            (6, 0.14),
            (7, 0.13),
            (8, 0.12),
            (9, 0.11),
            (10, 0.10),
        ),
    ) -> None:
        super().__init__(
            dup_line_frac=dup_line_frac,
            dup_para_frac=dup_para_frac,
            dup_line_char_frac=dup_line_char_frac,
            dup_para_char_frac=dup_para_char_frac,
            top_n_grams=[tuple(x) for x in top_n_grams],
            dup_n_grams=[tuple(x) for x in dup_n_grams],
        )

    @staticmethod
    def _dups(items: list[str]) -> tuple[int, int]:
        seen: set[str] = set()
        n = chars = 0
        for x in items:
            if x in seen:
                n += 1
                chars += len(x)
            else:
                seen.add(x)
        return n, chars

    def process(self, doc: Document) -> Document | Drop:
        text = doc.text
        if not text:
            return Drop("empty")
        size = len(text)
        sc: dict[str, float] = {}
        paras = re.split(r"\n{2,}", text.strip())
        n, chars = self._dups(paras)
        sc["dup_para_frac"], sc["dup_para_char_frac"] = n / len(paras), chars / size
        if self.dup_para_frac and sc["dup_para_frac"] > self.dup_para_frac:
            return self._verdict(doc, sc, Drop("dup_para_frac"))
        if self.dup_para_char_frac and sc["dup_para_char_frac"] > self.dup_para_char_frac:
            return self._verdict(doc, sc, Drop("dup_para_char_frac"))
        lines = re.split(r"\n+", text)
        n, chars = self._dups(lines)
        sc["dup_line_frac"], sc["dup_line_char_frac"] = n / len(lines), chars / size
        if self.dup_line_frac and sc["dup_line_frac"] > self.dup_line_frac:
            return self._verdict(doc, sc, Drop("dup_line_frac"))
        if self.dup_line_char_frac and sc["dup_line_char_frac"] > self.dup_line_char_frac:
            return self._verdict(doc, sc, Drop("dup_line_char_frac"))
        ws = words(text)
        if not ws:
            return self._verdict(doc, sc)
        grams = _NGramIndex(ws)
        for n_, frac in self.top_n_grams:
            if len(ws) >= n_:
                r = sc[f"top_{n_}_gram"] = grams.top_chars(n_) / size
                if r > frac:
                    return self._verdict(doc, sc, Drop(f"top_{n_}_gram"))
        no_dup_from = None  # if n-grams of size n never repeat, larger ones never do
        for n_, frac in sorted(self.dup_n_grams):
            if len(ws) < n_:
                continue
            if no_dup_from is not None and n_ >= no_dup_from:
                sc[f"duplicated_{n_}_n_grams"] = 0.0
                continue
            rep = grams.duplicated_chars(n_)
            if rep == 0:
                no_dup_from = n_
            r = sc[f"duplicated_{n_}_n_grams"] = rep / size
            if r > frac:
                return self._verdict(doc, sc, Drop(f"duplicated_{n_}_n_grams"))
        return self._verdict(doc, sc)


# ---------------------------------------------------------------------------------------------
# C4 and FineWeb
# ---------------------------------------------------------------------------------------------
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4Quality(TextStep):
    """C4 line rules (Raffel et al. 2020; datatrove ``C4QualityFilter`` defaults), per text node.

    Lines are removed when: a word is > 1000 chars; no terminal punctuation (. ? ! " ') or ending
    in "..."; < 3 words; containing "javascript"; containing a cookie/terms policy phrase. Citations
    ([1], [edit], [citation needed]) are stripped. The whole document is dropped on "lorem ipsum",
    on any "{", or with < 5 sentences left. Blank lines between paragraphs are kept.
    """

    name = "c4_quality"

    def __init__(
        self,
        remove_citations: bool = True,
        filter_no_terminal_punct: bool = True,
        min_num_sentences: int = 5,
        min_words_per_line: int = 3,
        max_word_length: int = 1000,
        filter_lorem_ipsum: bool = True,
        filter_javascript: bool = True,
        filter_curly_bracket: bool = True,
        filter_policy: bool = True,
    ) -> None:
        super().__init__(
            remove_citations=remove_citations,
            filter_no_terminal_punct=filter_no_terminal_punct,
            min_num_sentences=min_num_sentences,
            min_words_per_line=min_words_per_line,
            max_word_length=max_word_length,
            filter_lorem_ipsum=filter_lorem_ipsum,
            filter_javascript=filter_javascript,
            filter_curly_bracket=filter_curly_bracket,
            filter_policy=filter_policy,
        )

    def _line(self, line: str) -> str | None | Drop:
        line = line.strip()
        ws = line.split()
        if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in ws):
            return None
        if self.remove_citations:
            line = _CITATION.sub("", line)
        if self.filter_no_terminal_punct and (
            not line.endswith((".", "?", "!", '"', "'")) or line.endswith("...")
        ):
            return None
        if len(ws) < self.min_words_per_line:
            return None
        low = line.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in low:
            return Drop("lorem_ipsum")
        if self.filter_javascript and "javascript" in low:
            return None
        if self.filter_curly_bracket and "{" in line:
            return Drop("curly_bracket")
        if self.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
            return None
        return line

    def process(self, doc: Document) -> Document | Drop:
        sentences = n_lines = n_kept = 0
        verdict: list[Drop] = []

        def keep(par: str, _ctx: dict) -> str | None:
            nonlocal sentences, n_lines, n_kept
            if verdict:
                return None
            kept = []
            lines = par.splitlines()
            n_lines += len(lines)
            for line in lines:
                r = self._line(line)
                if isinstance(r, Drop):
                    verdict.append(r)
                    return None
                if r is not None:
                    kept.append(r)
                    if self.min_num_sentences != -1:
                        sentences += count_sentences(r)
            n_kept += len(kept)
            return "\n".join(kept) if kept else None

        out = _edit_paragraphs(doc, keep)
        if verdict:  # a whole-document rule fired part-way: the counts so far would mislead
            return verdict[0]
        sc: dict[str, float] = {"lines": n_lines, "lines_removed": n_lines - n_kept}
        if self.min_num_sentences != -1:
            sc["sentences"] = sentences
        if sentences < self.min_num_sentences:
            return self._verdict(doc, sc, Drop("too_few_sentences", f"{sentences} sentences"))
        return self._verdict(out, sc)


class C4Paragraph(TextStep):
    """mC4 paragraph rule (datatrove ``C4ParagraphFilter``): >= 3 lines of >= 200 characters."""

    name = "c4_paragraph"

    def __init__(self, min_paragraphs: int = 3, min_paragraph_len: int = 200) -> None:
        super().__init__(min_paragraphs=min_paragraphs, min_paragraph_len=min_paragraph_len)

    def process(self, doc: Document) -> Document | Drop:
        lines = doc.text.split("\n")
        long_ = sum(1 for ln in lines if len(ln) >= self.min_paragraph_len)
        sc = {"lines": len(lines), "long_lines": long_}
        if len(lines) < self.min_paragraphs or long_ < self.min_paragraphs:
            return self._verdict(doc, sc, Drop("c4_too_few_paragraphs"))
        return self._verdict(doc, sc)


class FineWebQuality(TextStep):
    """FineWeb quality rules (Penedo et al. 2024; datatrove ``FineWebQualityFilter`` defaults).

    Drop if: < 12% of non-empty lines end in terminal punctuation; > 67% of lines are <= 30 chars;
    characters in duplicated lines > 1% of all characters; newlines per word > 0.3.
    """

    name = "fineweb_quality"

    def __init__(
        self,
        line_punct_thr: float = 0.12,
        line_punct_exclude_zero: bool = False,
        short_line_thr: float = 0.67,
        short_line_length: int = 30,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
        stop_chars: list[str] | None = None,
    ) -> None:
        super().__init__(
            line_punct_thr=line_punct_thr,
            line_punct_exclude_zero=line_punct_exclude_zero,
            short_line_thr=short_line_thr,
            short_line_length=short_line_length,
            char_duplicates_ratio=char_duplicates_ratio,
            new_line_ratio=new_line_ratio,
            stop_chars=list(stop_chars) if stop_chars is not None else None,
        )
        self._stop = tuple(stop_chars) if stop_chars is not None else _FW_TERMINAL

    def process(self, doc: Document) -> Document | Drop:
        text = doc.text
        lines = [ln for ln in text.split("\n") if ln.strip() != ""]
        if not lines:
            return Drop("empty")
        sc: dict[str, float] = {}
        ratio = sc["line_punct_ratio"] = sum(1 for ln in lines if ln.endswith(self._stop)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return self._verdict(doc, sc, Drop("line_punct_ratio", f"{ratio:.3f}"))
        ratio = sum(1 for ln in lines if len(ln) <= self.short_line_length) / len(lines)
        sc["short_line_ratio"] = ratio
        if ratio > self.short_line_thr:
            return self._verdict(doc, sc, Drop("short_line_ratio", f"{ratio:.3f}"))
        dup_chars = GopherRepetition._dups(lines)[1]
        denom = len(text) - text.count("\n")
        if denom:
            ratio = sc["char_dup_ratio"] = dup_chars / denom
            if ratio > self.char_duplicates_ratio:
                return self._verdict(doc, sc, Drop("char_dup_ratio", f"{ratio:.3f}"))
        n_words = len(words(text))
        if n_words == 0:
            return self._verdict(doc, sc, Drop("list_ratio"))
        ratio = sc["list_ratio"] = text.count("\n") / n_words
        if ratio > self.new_line_ratio:
            return self._verdict(doc, sc, Drop("list_ratio"))
        return self._verdict(doc, sc)


# sentence-final marks: Unicode punctuation named FULL STOP / QUESTION MARK / EXCLAMATION MARK /
# DANDA / INTERROBANG (as datatrove's TERMINAL_PUNCTUATION; quotes and ellipsis do not count)
_FW_TERMINAL = tuple(
    "!.?\u037e\u055c\u055e\u0589\u061f\u06d4\u0701\u0702\u07f9\u0964\u0965\u1362\u1367\u166e\u1803\u1809"
    "\u1944\u1945\u203c\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2cfe\u2e3c\u2e53\u2e54\u3002\ua4ff"
    "\ua60e\ua60f\ua6f3\ua6f7\ua8ce\ua8cf\uaa5d\uaa5e\uaa5f\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01"
    "\uff0e\uff1f\uff61"
)


# ---------------------------------------------------------------------------------------------
# OmniCorpus English human-feedback rules
# ---------------------------------------------------------------------------------------------
# Rule parameters as published with the rules (OpenGVLab/OmniCorpus human_feedback_textfiltering);
# each list is a constructor argument, so a config can replace it.
OMNI_CAPTION_WORDS = ("download", "load", "getty", "image", "photo", "source")
OMNI_HEADER_FOOTER_KEYWORDS = (
    "We appreciate your help to end bad business websites", "Not Your Average WordPress Web Design Agency",
    "Subscribe to receive exclusive content and notifications", "Services", "Any questions?",
    "Downloadable software products", "Some health and personal care items",
    "Please contact us through our Contact Us page to open a return ticket.", "Top image", "Like Liked",
    "Looking for", "How do I login to my zoom account", "Watch on YouTube", "Contact Information",
    "Read More", "Showing 1–9 of 7361 results", "Call Us", "There are no reviews yet", "Related Fellow",
    "Want More", "More information", "Login and Registration", "Google+", "YouTube", "Subscribe",
    "Available for you in", "Sign in", "view details", "ID #", "Thank you so much for reading",
)  # fmt: skip
OMNI_UNFINISHED_PHRASES = (
    "read more", "more words", "read next", "learn more", "see this article", "click here", "continue reading",
    "read full article", "see more", "click to view details", "read the rest", "expand", "show more",
    "continue browsing", "read next section", "view full content", "read on", "see remaining",
    "continue watching", "explore more",
)  # fmt: skip
OMNI_COUNTER_ENDINGS = ("likes", "followers", "subscribes", "share", "comments", "comments:", "dislikes", "comment", "comment.")  # fmt: skip
OMNI_SOCIAL_ENDINGS = (
    "references", "like", "likes", "share", "shares", "comment", "comments", "review", "reviews", "reviews about",
    "call us at", "email us at", "more images", "users online", "copyright", "subscribe", "subscribes",
)  # fmt: skip
OMNI_SOCIAL_CONTAINS = ("for more info", "for more detail", "top threads", "most read", "most viewed", "most shared", "most liked", "more here")  # fmt: skip
OMNI_SHORT_PATTERNS = ("sign-in", "sign in", "sign up", "read more", "item in cart")
OMNI_STOPWORDS = frozenset(["the", "is", "are", "am", "to", "of", "and", "that", "have", "with"])

_NEWLINE_KEEP_AFTER = ".!?:;)'\""
_DOWNLOAD_RE = re.compile(r"for details on the|the link is", re.I)
_SOURCE_RE = re.compile(r"^special thanks|published\s*by|all\s*photo\s*credits\s*and\s*copyright", re.I)
_SOURCE_END_RE = re.compile(r"\(cf\..*?\)$|\([\w\s&,]+\s*,\s*\d{4,}\)$")
_URL_RE = re.compile(
    r"\b(?:https?|ftp|file)://\S*[\w/#=&%~+-]|\b[A-Za-z0-9][\w-]+(?:[@.][A-Za-z0-9][\w/-]+){2,}/?", re.I
)
_UNDERLINES = re.compile(r"_{15,}")
_UPPER_RE = re.compile(r"[A-ZÀ-ÖØ-ÞΑ-ΩА-Я]")  # Latin, Greek and Cyrillic capitals
_DIGIT_RE = re.compile(r"\d")
_WORDCHARS_RE = re.compile(r"\w+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.?!])\s")
_MONTHS = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_MON = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME_PATTERNS = (
    rf"{_MONTHS}\s\d{{1,2}},\s\d{{4}}", rf"{_MON}\s\d{{1,2}},\s\d{{4}}", rf"\d{{1,2}}\s{_MON}\s\d{{4}}",
    r"\b\d{1,2}[:.]\d{2}\s*(?:a|p)?\.?m\.?\b", r"\b(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?\b",
    r"\b(?:[01]?\d|2[0-3])(?::[0-5]\d)?[ap]\.?m\.?\b",
)  # fmt: skip
_PHONE_RE = re.compile(r"\d{3}-\d{3}-\d{4}|\(\d{3}\)\s?\d{3}-\d{4}")
_TIME_RE = re.compile("|".join(_TIME_PATTERNS))
_PHOTO_CREDIT_RE = re.compile(r"\(Photo:[A-Za-z,\s]{0,20}\)")
# short "leaf" lines that are bylines, dates, handles, e-mails, phone numbers or links
_LEAF_RE = re.compile(
    "|".join(
        (r"published on", r"published by", r"\d{4}-\d{2}-\d{2}", r"\d{2}-\d{2}-\d{2}", r"\d{4}/\d{2}/\d{2}",
         r"\d{2}/\d{2}/\d{4}", r"@[A-Za-z0-9_]+", r"\b[\w.%+-]+@[\w.-]+\.[A-Za-z]{2,}\b", r"\d{3}-\d{3}-\d{4}",
         r"https?://[\w.%-]+") + _TIME_PATTERNS
    )
)  # fmt: skip
_REF_ITEM_RE = re.compile(r"\[\d{1,2}\]\s.*\.")
_REF_MARK_RE = re.compile(r"\s\[\d{1,2}\]")


class OmniCorpusEnglish(TextStep):
    """OmniCorpus English human-feedback rules (``human_feedback_textfiltering/run.py``), in order.

    Applied to the paragraphs of the text nodes (a paragraph plays the role of the rules' ``<p>``;
    images are the ``<graphic>`` elements), up to ``max_passes`` times until nothing changes:

    1. join lines that do not end in ``.!?:;)'"``; split at runs of >= 15 underscores; drop
       "[Video]"; trim incomplete sentences at the start and end of the document;
    2. drop a paragraph that: mentions a download link ("For details on the", "the link is"); is a
       source credit ("Special thanks...", "published by", "All photo credits and copyright",
       ends in "(cf. ...)" or "(Name, YYYY)"); has > 80% upper-case or > 80% digit characters
       (kept within 10 lines of an image); ends in a social counter (likes/followers/share/...);
       is one word (kept within 10 lines of an image); has <= 10 words and sign-in/read-more/cart
       phrases; has flagged words >= 2% (with ``flagged_words``); contains a header/footer keyword
       or has < 10 characters; ends unfinished ("read more", "click here", ... 20 phrases); is a
       short caption (< 8 words) next to an image with download/load/getty/image/photo/source;
       is "advertisement"; has <= 2, then <= 4 words; starts "Things to do"; is a short (< 10
       words) byline/date/handle/e-mail/phone/link line; ends in a social ending ("share",
       "comments", "subscribe", ...) or contains "most viewed"-like phrases; has a phone number
       (< 80 words), a date/time (< 20 words), or starts "By "/"(Photo: ...)" (< 10 words);
    3. citations: trailing "[n] ..." reference lists (and " [n]" marks in the text), everything
       from a short "reference" paragraph in the last quarter on, "sponsored" paragraphs, and a
       last paragraph wholly in parentheses are removed; URLs are stripped;
    4. images whose source is empty or an ``.html`` page are removed.

    Document level (text only, on the result): 50..100000 tokens with mean length 3..10; > 80% of
    tokens with a letter; >= 2 occurrences of {the, is, are, am, to, of, and, that, have, with};
    with > 2 images, >= 50 words per image; longest paragraph >= 35 words or mean >= 12 words.
    Not implemented: heading-level (``rend``) rules and the Merriam-Webster special case (the
    document keeps no markup); the flagged-word rules need ``flagged_words``. Lines inside a
    paragraph are judged with it (the rules also look at single ``<lb>`` lines).
    """

    name = "omnicorpus_en"

    def __init__(
        self,
        max_uppercase_ratio: float = 0.8,
        max_digit_ratio: float = 0.8,
        image_proximity_lines: int = 10,
        short_pattern_words: int = 10,
        min_paragraph_chars: int = 10,
        caption_max_words: int = 8,
        very_short_words: int = 2,
        too_short_words: int = 4,
        leaf_max_words: int = 10,
        phone_max_words: int = 80,
        date_max_words: int = 20,
        byline_max_words: int = 10,
        min_doc_words: int = 50,
        max_doc_words: int = 100000,
        min_mean_word_length: float = 3,
        max_mean_word_length: float = 10,
        min_alpha_words_ratio: float = 0.8,
        min_stop_words: int = 2,
        max_images_without_ratio: int = 2,
        min_words_per_image: float = 50,
        min_max_paragraph_words: int = 35,
        min_mean_paragraph_words: float = 12,
        join_broken_lines: bool = True,
        trim_incomplete_sentences: bool = True,
        flagged_words: list[str] | None = None,
        max_flagged_ratio: float = 0.02,
        header_footer_keywords: list[str] | None = None,
        caption_words: list[str] | None = None,
        unfinished_phrases: list[str] | None = None,
        max_passes: int = 3,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self._flagged = frozenset(w.lower() for w in flagged_words) if flagged_words else None
        self._hf = tuple(
            header_footer_keywords if header_footer_keywords is not None else OMNI_HEADER_FOOTER_KEYWORDS
        )
        self._captions = tuple(caption_words if caption_words is not None else OMNI_CAPTION_WORDS)
        phrases = unfinished_phrases if unfinished_phrases is not None else OMNI_UNFINISHED_PHRASES
        self._unfinished = [p.lower() for p in phrases]
        self._unfinished_re = (
            re.compile(r"\b(?:" + "|".join(re.escape(p) for p in self._unfinished) + r")\b", re.I)
            if self._unfinished
            else None
        )

    # -- paragraph rules ---------------------------------------------------------------------
    def _unfinished_end(self, p: str) -> bool:
        """The paragraph ends in a "read more"-style phrase (the rules' ``Is_finished`` test)."""
        if self._unfinished_re is None or not self._unfinished_re.search(p):
            return False
        sentences = _SENTENCE_SPLIT.split(p)
        last = sentences[-1].strip()
        low = last.lower()
        for phrase in self._unfinished:
            at = low.rfind(phrase)
            if at < 0 or not re.search(rf"\b{re.escape(phrase)}\b", low):
                continue
            if last and last[-1] not in ".!?" and not re.search(r"[a-z0-9]", low[at + len(phrase) :]):
                return True
            if len(sentences) == 1:
                return True
        return False

    def _paragraph(self, p: str, ctx: dict) -> str | None:
        if self.join_broken_lines and "\n" in p:
            lines = p.split("\n")
            out = [lines[0]]
            for ln in lines[1:]:
                prev = out[-1].rstrip()
                if prev and prev[-1] in _NEWLINE_KEEP_AFTER:
                    out.append(ln)
                else:
                    out[-1] = prev + " " + ln.lstrip()
            p = "\n".join(out)
        p = p.replace("[Video]", "").strip()
        if not p:
            return None
        low = p.lower()
        ws = p.split()
        n = len(ws)
        near = ctx["lines_to_image"] <= self.image_proximity_lines
        if _DOWNLOAD_RE.search(p) or _SOURCE_RE.search(p) or _SOURCE_END_RE.search(p):
            return None
        nonspace = len(p) - sum(p.count(c) for c in " \n\t")
        if not near and nonspace and len(_UPPER_RE.findall(p)) / nonspace > self.max_uppercase_ratio:
            return None
        if not near and len(_DIGIT_RE.findall(p)) / len(p) > self.max_digit_ratio:
            return None
        if low.endswith(OMNI_COUNTER_ENDINGS):
            return None
        if n == 1 and not near:
            return None
        if n <= self.short_pattern_words and any(x in low for x in OMNI_SHORT_PATTERNS):
            return None
        if self._flagged is not None:
            ow = obelics_words(p)
            if ow and sum(1 for w in ow if w in self._flagged) / len(ow) >= self.max_flagged_ratio:
                return None
        if len(p) < self.min_paragraph_chars or any(k in p for k in self._hf):
            return None
        if self._unfinished_end(p):
            return None
        p = _URL_RE.sub("", p).strip()
        if not p:
            return None
        low = p.lower()
        if (ctx["after_image"] or ctx["before_image"]) and len(
            _WORDCHARS_RE.findall(low)
        ) < self.caption_max_words:
            if any(w in low for w in self._captions):
                return None
        if low == "advertisement":
            return None
        n = len(p.split())
        if n <= self.very_short_words or n <= self.too_short_words:
            return None
        if p.startswith("Things to do"):
            return None
        n_sp = len(p.split(" "))
        if n_sp < self.leaf_max_words and _LEAF_RE.search(p):
            return None
        stripped = low.rstrip().rstrip(":").rstrip()
        if stripped.endswith(OMNI_SOCIAL_ENDINGS) or any(x in low for x in OMNI_SOCIAL_CONTAINS):
            return None
        if n_sp < self.phone_max_words and _PHONE_RE.search(p):
            return None
        if n_sp < self.date_max_words and _TIME_RE.search(p):
            return None
        if n_sp < self.byline_max_words and (low.strip().startswith("by ") or _PHOTO_CREDIT_RE.search(p)):
            return None
        return p

    # -- document-wide paragraph rules -------------------------------------------------------
    def _document_edits(self, doc: Document) -> Document:
        """Reference lists, "sponsored"/"reference" tails, a closing parenthesised note, sentence trims."""
        spots = [(i, j) for i, t in enumerate(doc.texts) if t is not None for j in range(len(_paragraphs(t)))]
        if not spots:
            return doc
        paras = {i: _paragraphs(t) for i, t in enumerate(doc.texts) if t is not None}
        flat = [paras[i][j] for i, j in spots]
        drop = [False] * len(flat)
        # numbered reference list at the end: drop it and the [n] marks in the text
        refs = [k for k, p in enumerate(flat) if _REF_ITEM_RE.match(p)]
        strip_marks = bool(refs) and refs[-1] >= len(flat) - 5
        if strip_marks:
            for k in refs:
                drop[k] = True
        # "reference" heading in the last quarter (everywhere in short documents): cut from there
        start = len(flat) - len(flat) // 4 if len(flat) > 20 else 0
        cut = False
        for k in range(start, len(flat)):
            p = flat[k]
            if not cut and len(p.split(" ")) < 10 and "reference" in p.lower():
                cut = True
            if cut or "sponsore" in p.lower():
                drop[k] = True
        # a last paragraph wholly in parentheses is a disclaimer
        last = max((k for k in range(len(flat)) if not drop[k]), default=None)
        if last is not None and flat[last].startswith("(") and flat[last].endswith(")"):
            drop[last] = True
        if self.trim_incomplete_sentences:
            _trim_document_edges(flat, drop)
        new_texts = list(doc.texts)
        for i in paras:
            kept = [flat[k] for k, (ii, _j) in enumerate(spots) if ii == i and not drop[k] and flat[k]]
            if strip_marks:
                kept = [_REF_MARK_RE.sub("", p) for p in kept]
            new_texts[i] = "\n\n".join(kept) if kept else None
        keep = [not (t is None and x is None) for t, x in zip(new_texts, doc.images)]
        return Document(
            texts=[t for t, k in zip(new_texts, keep) if k],
            images=[x for x, k in zip(doc.images, keep) if k],
            metadata=[m for m, k in zip(doc.metadata, keep) if k],
            general_metadata=doc.general_metadata,
        )

    def process(self, doc: Document) -> Document | Drop:
        if any(t is not None and "_" * 15 in t for t in doc.texts):
            doc = Document(
                texts=[_UNDERLINES.sub("\n\n", t) if t is not None else None for t in doc.texts],
                images=doc.images,
                metadata=doc.metadata,
                general_metadata=doc.general_metadata,
            )
        bad = {
            i for i, x in enumerate(doc.images) if x is not None and (not x or x.lower().endswith(".html"))
        }
        if bad:
            self.remove_image("omnicorpus_bad_image_src", len(bad))
            doc = doc.select([i not in bad for i in range(len(doc.texts))])
        for _ in range(self.max_passes):
            new = _edit_paragraphs(doc, self._paragraph, image_aware=True)
            new = self._document_edits(new)
            changed = new.texts != doc.texts or new.images != doc.images
            doc = new
            if not changed:
                break
        return self._document(doc)

    # -- document rules ----------------------------------------------------------------------
    def _document(self, doc: Document) -> Document | Drop:
        text = doc.text
        toks = words(text)
        n = len(toks)
        sc: dict[str, float] = {"words": n}
        if n == 0 or not self.min_doc_words <= n <= self.max_doc_words:
            return self._verdict(doc, sc, Drop("omnicorpus_word_count", f"{n} tokens"))
        mean = sc["mean_word_length"] = sum(map(len, toks)) / n
        if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
            return self._verdict(doc, sc, Drop("omnicorpus_mean_word_length", f"{mean:.2f}"))
        alpha = sc["alpha_words_ratio"] = sum(1 for w in toks if w.isalpha() or _has_alpha(w)) / n
        if alpha <= self.min_alpha_words_ratio:
            return self._verdict(doc, sc, Drop("omnicorpus_alpha_words", f"{alpha:.2f}"))
        stop = sc["stop_words"] = sum(1 for w in toks if w in OMNI_STOPWORDS)
        if stop < self.min_stop_words:
            return self._verdict(doc, sc, Drop("omnicorpus_stop_words"))
        if self._flagged is not None:
            ow = obelics_words(text)
            if ow:
                r = sc["flagged_ratio"] = sum(1 for w in ow if w in self._flagged) / len(ow)
                if r > self.max_flagged_ratio:
                    return self._verdict(doc, sc, Drop("omnicorpus_flagged_words"))
        n_img = doc.n_images
        if n_img > self.max_images_without_ratio:
            n_words = len(text.split())
            sc["words_per_image"] = n_words / n_img
            if n_words / n_img < self.min_words_per_image:
                detail = f"{n_words} words, {n_img} images"
                return self._verdict(doc, sc, Drop("omnicorpus_image_text_ratio", detail))
        lengths = [len(p.split()) for t in doc.texts if t is not None for p in _paragraphs(t)]
        if lengths:
            sc["max_paragraph_words"] = longest = max(lengths)
            sc["mean_paragraph_words"] = mean = sum(lengths) / len(lengths)
            if longest < self.min_max_paragraph_words and mean < self.min_mean_paragraph_words:
                return self._verdict(doc, sc, Drop("omnicorpus_paragraph_lengths"))
        return self._verdict(doc, sc)


_SENT_PIECES = re.compile(r"((?<![A-Z][a-z]\.)(?<=[.?!])[\"']?\s)")  # sentence ends, not after "Mr."
_COMPLETE_END = (".", "!", "?", "”", '"')


def _trim_document_edges(flat: list[str], drop: list[bool]) -> None:
    """Remove incomplete sentences before the document's first complete one and after its last one.

    From the start, sentences that do not end in . ! ? or a closing quote are dropped, paragraph
    after paragraph, until a paragraph keeps something; the same from the end.
    """
    order = [k for k in range(len(flat)) if not drop[k]]
    for k in order:
        pieces = _SENT_PIECES.split(flat[k])  # sentences at even, separators at odd indices
        first = next(
            (i for i in range(0, len(pieces), 2) if pieces[i].rstrip().endswith(_COMPLETE_END)), None
        )
        flat[k] = "" if first is None else "".join(pieces[first:]).strip()
        if flat[k]:
            break
    for k in reversed(order):
        if not flat[k]:
            continue
        pieces = _SENT_PIECES.split(flat[k])
        last = next(
            (i for i in range(len(pieces) - 1, -1, -2) if pieces[i].rstrip().endswith(_COMPLETE_END)), None
        )
        flat[k] = "" if last is None else "".join(pieces[: last + 1]).strip()
        if flat[k]:
            break


# ---------------------------------------------------------------------------------------------
# OBELICS node- and document-level rules
# ---------------------------------------------------------------------------------------------
OBELICS_PUNCTUATION = (".", ",", "!", "?", ";", ":", "…")


def char_repetition_ratio(text: str, n: int) -> float:
    """OBELICS/BigScience: share of the top sqrt(#distinct) repeated character n-grams.

    Character n-grams are 64-bit rolling keys of the code points (numpy), not Python substrings.
    """
    if len(text) < n:
        return 0.0
    if len(text) < 512:  # short texts: Python substrings beat numpy's per-call overhead
        counts = sorted(Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
        k = min(int(math.sqrt(len(counts))), len(counts) - counts.count(1))
        return sum(counts[:k]) / sum(counts)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    m = len(cps) - n + 1
    keys = cps[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            keys = keys * _NGramIndex._MUL ^ cps[j : j + m]
    s = np.sort(keys)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    freqs = np.sort(np.diff(np.concatenate((starts, [m]))))[::-1]
    ones = int(np.count_nonzero(freqs == 1))
    k = min(int(math.sqrt(len(freqs))), len(freqs) - ones)
    return float(freqs[:k].sum()) / float(freqs.sum())


def word_repetition_ratio(ws: list[str], n: int) -> float:
    """OBELICS: share of word n-gram occurrences whose n-gram occurs more than once."""
    if len(ws) < n:
        return 0.0
    counts = _ngram_counts(ws, n)
    total = sum(counts.values())
    return sum(c for c in counts.values() if c > 1) / total


def special_character_ratio(text: str) -> float:
    if not text:
        return 0.0
    return (len(text) - len(text.translate(_SPECIAL_DELETE))) / len(text)


def punctuation_ratio(text: str, min_tokens: int = -1) -> float:
    toks = _OBELICS_PUNCT_TOKENS.findall(text)
    if not toks:
        return 0.0
    if min_tokens > 0 and len(toks) < min_tokens:
        return 1.0
    return sum(1 for t in toks if t in OBELICS_PUNCTUATION) / len(toks)


_OBELICS_PUNCT_TOKENS = re.compile(r"[\w']+|[.,!?;:…]")


class _ObelicsRules(TextStep):
    def _check(self, text: str, prefix: str, sc: dict | None = None) -> str | None:
        """The first failed rule's name for ``text`` (None: all pass); the measured quantities go
        to ``sc`` when given (documents; paragraphs are too many to record)."""
        sc = {} if sc is None else sc
        ws = obelics_words(text)
        n = sc["words"] = len(ws)
        if not self.min_words <= n <= self.max_words:
            return f"{prefix}_word_count"
        if self.max_char_repetition is not None:
            r = sc["char_repetition"] = char_repetition_ratio(text, self.char_repetition_length)
            if r > self.max_char_repetition:
                return f"{prefix}_char_repetition"
        if self.max_word_repetition is not None:
            r = sc["word_repetition"] = word_repetition_ratio(ws, self.word_repetition_length)
            if r > self.max_word_repetition:
                return f"{prefix}_word_repetition"
        if self.max_special_char_ratio is not None:
            r = sc["special_char_ratio"] = special_character_ratio(text)
            if r > self.max_special_char_ratio:
                return f"{prefix}_special_characters"
        if self.min_stopword_ratio is not None and n:
            r = sc["stopword_ratio"] = sum(1 for w in ws if w in self._stop) / n
            if r < self.min_stopword_ratio:
                return f"{prefix}_stopwords"
        if self._flagged is not None and n:
            r = sc["flagged_ratio"] = sum(1 for w in ws if w in self._flagged) / n
            if r > self.max_flagged_ratio:
                return f"{prefix}_flagged_words"
        if self.min_punctuation_ratio is not None:
            r = sc["punctuation_ratio"] = punctuation_ratio(text, self.punctuation_min_words)
            if r < self.min_punctuation_ratio:
                return f"{prefix}_punctuation"
        if self._common is not None and n:
            r = sc["common_word_ratio"] = sum(1 for w in ws if w in self._common) / n
            if r < self.min_common_word_ratio:
                return f"{prefix}_common_words"
        return None

    def _setup(self, stopwords, flagged_words, common_words) -> None:
        self._stop = frozenset(w.lower() for w in stopwords) if stopwords else STOPWORDS_EN
        self._flagged = frozenset(w.lower() for w in flagged_words) if flagged_words else None
        self._common = frozenset(w.lower() for w in common_words) if common_words else None


class ObelicsParagraph(_ObelicsRules):
    """OBELICS node-level text rules (``config_filter_web_documents.yaml``), per paragraph.

    A paragraph is removed if: words outside [4, 1000]; character 10-gram repetition > 0.1; word
    5-gram repetition > 0.1; special characters > 0.3; stop words < 0.3; flagged words > 0.01
    (with ``flagged_words``); punctuation < 0.001 (checked from 12 tokens); common words < 0.8
    (with ``common_words``). Language id and perplexity are off (model files).
    """

    name = "obelics_paragraph"

    def __init__(
        self,
        min_words: int = 4,
        max_words: int = 1000,
        char_repetition_length: int = 10,
        max_char_repetition: float | None = 0.1,
        word_repetition_length: int = 5,
        max_word_repetition: float | None = 0.1,
        max_special_char_ratio: float | None = 0.3,
        min_stopword_ratio: float | None = 0.3,
        max_flagged_ratio: float = 0.01,
        min_punctuation_ratio: float | None = 0.001,
        punctuation_min_words: int = 12,
        min_common_word_ratio: float = 0.8,
        stopwords: list[str] | None = None,
        flagged_words: list[str] | None = None,
        common_words: list[str] | None = None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self._setup(stopwords, flagged_words, common_words)

    def process(self, doc: Document) -> Document | Drop:
        n = removed = 0

        def keep(p: str, _ctx: dict) -> str | None:
            nonlocal n, removed
            n += 1
            if self._check(p, "obelics_paragraph") is None:
                return p
            removed += 1
            return None

        out = _edit_paragraphs(doc, keep)
        return self._verdict(out, {"paragraphs": n, "paragraphs_removed": removed})


class ObelicsDocument(_ObelicsRules):
    """OBELICS document-level rules: images in [1, 30]; words in [10, 2000]; char 10-gram repetition
    <= 0.1; word 5-gram repetition <= 0.2; special characters <= 0.275; stop words >= 0.35; flagged
    words <= 0.01 (with a list); punctuation >= 0.03; common words >= 0.9 (with a list)."""

    name = "obelics_document"

    def __init__(
        self,
        min_images: int = 1,
        max_images: int = 30,
        min_words: int = 10,
        max_words: int = 2000,
        char_repetition_length: int = 10,
        max_char_repetition: float | None = 0.1,
        word_repetition_length: int = 5,
        max_word_repetition: float | None = 0.2,
        max_special_char_ratio: float | None = 0.275,
        min_stopword_ratio: float | None = 0.35,
        max_flagged_ratio: float = 0.01,
        min_punctuation_ratio: float | None = 0.03,
        punctuation_min_words: int = -1,
        min_common_word_ratio: float = 0.9,
        stopwords: list[str] | None = None,
        flagged_words: list[str] | None = None,
        common_words: list[str] | None = None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self._setup(stopwords, flagged_words, common_words)

    def process(self, doc: Document) -> Document | Drop:
        n_img = doc.n_images
        sc: dict[str, float] = {"images": n_img}
        if not self.min_images <= n_img <= self.max_images:
            return self._verdict(doc, sc, Drop("obelics_document_image_count", f"{n_img} images"))
        reason = self._check(doc.text, "obelics_document", sc)
        return self._verdict(doc, sc, Drop(reason) if reason else None)


# ---------------------------------------------------------------------------------------------
# image rules
# ---------------------------------------------------------------------------------------------
IMAGE_URL_BAN_WORDS = ["logo", "button", "icon", "plugin", "widget", "porn", "xxx", "sex"]
_EXT_RE = re.compile(r"\.([a-z0-9]{2,5})$")
_KNOWN_IMAGE_EXT = {
    "jpg",
    "jpeg",
    "png",
    "gif",
    "webp",
    "bmp",
    "svg",
    "ico",
    "tif",
    "tiff",
    "avif",
    "heic",
    "jfif",
}


def _url_ext(url: str) -> str | None:
    path = url.split("?", 1)[0].split("#", 1)[0].lower()
    m = _EXT_RE.search(path)
    return m.group(1) if m else None


class ImageNodes(TextStep):
    """Image-node rules (MMC4, OBELICS, OmniCorpus): remove image nodes that fail, keep the text.

    An image is removed if its URL contains a ban word (MMC4 logo/button/icon/plugin/widget +
    OBELICS porn/xxx/sex); its format (``metadata['format']`` once fetched, else the URL's file
    extension when it is an image extension) is not jpg/jpeg/png/webp (OBELICS); a known side
    (fetched ``real_width``/``real_height``, else the page's ``width``/``height``) is outside
    [150, 20000] px; or the aspect ratio is outside [0.5, 2]. Unknown sizes and formats pass (the
    pixel filters after fetching check them again). ``drop_if_no_images``: a document left without
    images is dropped (OmniCorpus keeps only documents with images).
    """

    name = "image_nodes"

    def __init__(
        self,
        valid_formats: list[str] | None = ("jpg", "jpeg", "png", "webp"),
        min_side: int = 150,
        max_side: int = 20000,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        url_ban_words: list[str] | None = None,
        check_page_sizes: bool = True,
        drop_if_no_images: bool = True,
    ) -> None:
        super().__init__(
            valid_formats=[f.lower().lstrip(".") for f in valid_formats] if valid_formats else None,
            min_side=min_side,
            max_side=max_side,
            min_aspect_ratio=min_aspect_ratio,
            max_aspect_ratio=max_aspect_ratio,
            url_ban_words=list(IMAGE_URL_BAN_WORDS if url_ban_words is None else url_ban_words),
            check_page_sizes=check_page_sizes,
            drop_if_no_images=drop_if_no_images,
        )
        self._ban = (
            re.compile("|".join(re.escape(w.lower()) for w in self.url_ban_words))
            if self.url_ban_words
            else None
        )
        self._formats = frozenset(self.valid_formats) if self.valid_formats else None
        if self._formats and "jpg" in self._formats:
            self._formats |= {"jpeg"}

    def image_reason(self, url: str, meta: dict | None) -> str | None:
        """Why the image fails (None: it passes)."""
        meta = meta or {}
        if self._ban is not None and self._ban.search(url.lower()):
            return "image_url_ban_word"
        if self._formats is not None:
            fmt = meta.get("format")
            fmt = str(fmt).lower() if fmt else _url_ext(url)
            if fmt in ("jpe", "jfif"):
                fmt = "jpeg"
            if fmt and (meta.get("format") or fmt in _KNOWN_IMAGE_EXT) and fmt not in self._formats:
                return "image_format"
        w, h = meta.get("real_width"), meta.get("real_height")
        if (w is None or h is None) and self.check_page_sizes:
            w = w if w is not None else meta.get("width")
            h = h if h is not None else meta.get("height")
        for side in (w, h):
            if isinstance(side, (int, float)) and not self.min_side <= side <= self.max_side:
                return "image_size"
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and h > 0:
            if not self.min_aspect_ratio <= w / h <= self.max_aspect_ratio:
                return "image_aspect_ratio"
        return None

    def process(self, doc: Document) -> Document | Drop:
        keep = []
        n_img = n_removed = 0
        for url, meta in zip(doc.images, doc.metadata):
            if url is None:
                keep.append(True)
                continue
            n_img += 1
            reason = self.image_reason(url, meta)
            if reason is not None:
                self.remove_image(reason)
                n_removed += 1
            keep.append(reason is None)
        sc = {"images": n_img, "images_removed": n_removed}
        out = doc.select(keep) if n_removed else doc
        if self.drop_if_no_images and out.n_images == 0:
            return self._verdict(doc, sc, Drop("no_images_left"))
        return self._verdict(_merge_adjacent_texts(out) if n_removed else out, sc)


def _merge_adjacent_texts(doc: Document) -> Document:
    """Join text nodes that became neighbours after an image between them was removed."""
    if all(not (a is not None and b is not None) for a, b in zip(doc.texts, doc.texts[1:])):
        return doc
    out = Document(general_metadata=doc.general_metadata)
    for t, x, m in doc.nodes():
        if t is not None and out.texts and out.texts[-1] is not None:
            out.texts[-1] = out.texts[-1] + "\n\n" + t
        else:
            out.texts.append(t)
            out.images.append(x)
            out.metadata.append(m)
    return out


class ImageTextRatio(TextStep):
    """Image/text balance: images in [min_images, max_images] (OBELICS [1, 30]); with more than
    ``max_images_without_ratio`` images (OmniCorpus: 2), at least ``min_words_per_image`` words per
    image (OmniCorpus: 50)."""

    name = "image_text_ratio"

    def __init__(
        self,
        min_images: int = 1,
        max_images: int | None = 30,
        max_images_without_ratio: int = 2,
        min_words_per_image: float = 50,
    ) -> None:
        super().__init__(
            min_images=min_images,
            max_images=max_images,
            max_images_without_ratio=max_images_without_ratio,
            min_words_per_image=min_words_per_image,
        )

    def process(self, doc: Document) -> Document | Drop:
        n_img = doc.n_images
        sc: dict[str, float] = {"images": n_img}
        if n_img < self.min_images:
            return self._verdict(doc, sc, Drop("too_few_images", f"{n_img} images"))
        if self.max_images is not None and n_img > self.max_images:
            return self._verdict(doc, sc, Drop("too_many_images", f"{n_img} images"))
        if n_img > self.max_images_without_ratio:
            n_words = sum(len(t.split()) for t in doc.texts if t is not None)
            sc["words_per_image"] = n_words / n_img
            if n_words / n_img < self.min_words_per_image:
                detail = f"{n_words} words, {n_img} images"
                return self._verdict(doc, sc, Drop("low_words_per_image", detail))
        return self._verdict(doc, sc)


# ---------------------------------------------------------------------------------------------
# registry and config
# ---------------------------------------------------------------------------------------------
FILTERS: dict[str, type[Step]] = {
    "image_nodes": ImageNodes,
    "gopher_repetition": GopherRepetition,
    "gopher_quality": GopherQuality,
    "c4_quality": C4Quality,
    "c4_paragraph": C4Paragraph,
    "fineweb_quality": FineWebQuality,
    "omnicorpus_en": OmniCorpusEnglish,
    "obelics_paragraph": ObelicsParagraph,
    "obelics_document": ObelicsDocument,
    "image_text_ratio": ImageTextRatio,
}

# The default text-filter stage, cheapest first (OmniCorpus stage 2 "Gopher + C4 rules"; C4 as
# FineWeb published it, filter_no_terminal_punct=False with every other rule on, the curly-bracket
# rule included: it drops pages with code, so a code-heavy corpus may want it off in its config;
# the OmniCorpus human-feedback rules run late, as in the paper).
DEFAULT_FILTERS: list = [
    "image_nodes",
    "gopher_repetition",
    "gopher_quality",
    {"c4_quality": {"filter_no_terminal_punct": False}},
    "fineweb_quality",
    "image_text_ratio",
]


def build_filters(spec: list | None = None) -> list[Step]:
    """Instantiate filters from a config list: names or ``{name: {kwarg: value}}`` (None: defaults)."""
    spec = DEFAULT_FILTERS if spec is None else spec
    steps: list[Step] = []
    for item in spec:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, kwargs = next(iter(item.items()))
            kwargs = kwargs or {}
        else:
            raise ConfigError(f"bad filter entry {item!r}: a name or {{name: {{kwargs}}}}")
        if name not in FILTERS:
            raise ConfigError(f"unknown filter 'filters.{name}' (known: {', '.join(sorted(FILTERS))})")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"filters.{name}: options must be a mapping, got {kwargs!r}")
        check_options(name, FILTERS[name], kwargs)
        try:
            steps.append(FILTERS[name](**kwargs))
        except TypeError as exc:
            raise ConfigError(f"filters.{name}: {exc}") from None
    return steps


def check_options(
    name: str, cls: type, options: dict, where: str | None = None, aliases: dict[str, str] | None = None
) -> None:
    """Raise ``ConfigError`` for an option ``cls`` does not take or whose value has the wrong type.

    Types come from the constructor's annotations (else the default's type); a number option takes
    an int or a float but not a bool, a list option a list (YAML has no tuples). Checked once when
    the filters are built: a wrong type would otherwise turn every document into an error.
    Messages start with ``where`` (default ``filters.NAME``); ``aliases`` maps an option name
    to the constructor parameter it stands for.
    """
    where = where or f"filters.{name}"
    params = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [k for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the defaults' types
        hints = {}
    for key, value in options.items():
        param = (aliases or {}).get(key, key)
        if param not in known:
            if open_ended:
                continue
            raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(known)})")
        expected = hints.get(param)
        default = params[param].default
        if expected is None and default is not inspect.Parameter.empty and default is not None:
            expected = type(default)
        if expected is not None and not _fits(value, expected):
            raise ConfigError(f"{where}: option {key!r} must be {_type_name(expected)}, got {value!r}")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a config value fits annotation ``tp`` (the forms used by the filter constructors)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):  # an int is a fine float; True is no number
        ok = (int,) if tp is int else (int, float)
        return isinstance(value, ok) and not isinstance(value, bool)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is list and args:
            return all(_fits(v, args[0]) for v in value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return True
    return isinstance(value, origin or tp)


def _type_name(tp: Any, plural: bool = False) -> str:
    """``tp`` in words for an error message ("an integer or null", "a list of strings")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in args)
    if tp is type(None):
        return "null"
    if origin is list and args:
        return f"a list of {_type_name(args[0], plural=True)}"
    if origin is tuple and args:
        inner = ", ".join(_type_name(a).split()[-1] for a in args)
        return f"[{inner}] lists" if plural else f"a [{inner}] list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    name = names.get(tp, getattr(tp, "__name__", str(tp)))
    return name.split(" ", 1)[-1] + "s" if plural and tp in (int, float, str, list) else name
