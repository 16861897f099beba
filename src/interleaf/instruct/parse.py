"""Reading the generating LLM's tagged output and checking each instruction (MMInstruct step d).

The LLM answers in MMInstruct's tag format, numbered items::

    <Q1> question </Q1> <C1> A. ... B. ... C. ... D. ... </C1> <A1> B </A1>   # multiple choice
    <Q1> question </Q1> <C1> Yes, No </C1> <A1> Yes </A1>                     # judgement (C optional)
    <Q1> question </Q1> <A1> answer </A1>                                      # long / short VQA

What real LLMs add around that is read when it is unambiguous: tag numbers with leading zeros
(``<Q01>``), markdown bold around tags, values and option markers, list bullets before options,
full-width letters and brackets (``（Ａ）``), answers such as "The answer is B", "Answer: (B) text",
"答案：B", "Yes, the car is red."; what is not (an answer that names one option by letter and
another by text, options with extra lines of text) is rejected.

``parse_items`` returns every numbered item it finds, ``check_item`` turns one into an
:class:`Instruction` or a :class:`Reject` with a reason code:

- ``missing_answer``, ``empty_question``: a tag is missing or empty (a question without a word);
- ``placeholder_left``: the question still holds a seed's ``<placeholder>`` or the format's
  ``{the generated question}`` filler, or the question or answer is the filler of interleaf's own
  format lines ("question 1", "the short answer") echoed back;
- ``bad_options``: a multiple-choice item without exactly four options labelled A-D in order;
  ``duplicate_options``: two options with the same text;
- ``bad_answer``: a choice answer that names no option (letter or option text) or two different
  ones, a judgement answer that is not yes/no; ``answer_mismatch``: a letter followed by text that is not that option's;
- ``answer_too_long`` (short VQA) / ``answer_too_short`` (long VQA): the answer's length in units
  (words; each CJK character is one unit) against :class:`Checks`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from interleaf.corpus.dedup import exact_jaccard, normalise

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNIT_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_TAG_RE = {  # <Q1>, < q 1 >, <Q01>: the number without its leading zeros, closed by the same number
    tag: re.compile(rf"<\s*{tag}\s*0*(\d+)\s*>(.*?)<\s*/\s*{tag}\s*0*\1\s*>", re.S | re.I) for tag in "QCA"
}
# a seed's <placeholder> hugs its brackets; "x < 5 and y > 3" (spaces inside) is maths, not one
_PLACEHOLDER_RE = re.compile(
    r"<[^\s<>](?:[^<>\n]{0,58}[^\s<>])?>|\{[^{}\n]*generated[^{}\n]*\}|\bthe generated question\b", re.I
)
# the filler of interleaf's own format lines (engine.py), echoed instead of a question or an answer
_FILLER_QUESTION_RE = re.compile(r"^(?:question|问题)\s*\d*$", re.I)
_FILLER_ANSWERS = {"the detailed answer", "the short answer", "详细答案", "简短答案", "answer", "答案"}
LETTERS = "ABCD"
YES = {"yes", "true", "correct", "right", "是", "对", "正确", "是的"}
NO = {"no", "false", "incorrect", "wrong", "否", "不", "不是", "错", "错误", "不对"}


@dataclass
class Checks:
    """Limits an instruction must meet (lengths in units: words, or CJK characters)."""

    min_long_units: int = 25  # a long VQA answer at least this long
    max_short_units: int = 15  # a short VQA answer at most this long
    near_duplicate: float = 0.8  # questions of one image and type at least this similar are duplicates


@dataclass
class Instruction:
    """One checked instruction: the question, its options (multiple choice) and canonical answer
    (an option letter, Yes/No or 是/否, or the answer text)."""

    type: str
    question: str
    answer: str
    options: list[str] = field(default_factory=list)
    item: int = 0  # its number in the LLM's output (<Q1> -> 1)


@dataclass
class Reject:
    reason: str
    detail: str
    item: int = 0


def units(text: str) -> list[str]:
    """Words of ``text`` (normalised), each CJK character on its own."""
    return _UNIT_RE.findall(normalise(text))


# markdown bold or italics around a whole value (not "**a** and **b**")
_EMPHASIS_RE = re.compile(r"^(\*\*|\*(?=\S))((?:(?!\*\*).)*?)\1$", re.S)


def _clean(value: str) -> str:
    value = value.strip()
    for _ in range(3):  # the format's braces and quotes, or markdown bold, echoed around the value
        m = _EMPHASIS_RE.match(value)
        if m:
            value = m.group(2).strip()
        elif len(value) >= 2 and value[0] + value[-1] in ("{}", '""', "''", "“”", "「」"):
            value = value[1:-1].strip()
    return value


def parse_items(text: str) -> dict[int, dict[str, str]]:
    """``{n: {"Q": ..., "C": ..., "A": ...}}`` for every numbered tag found (tags case-insensitive,
    spaces inside tags allowed); the first occurrence of a tag number wins."""
    items: dict[int, dict[str, str]] = {}
    for tag, regex in _TAG_RE.items():
        for m in regex.finditer(text):
            items.setdefault(int(m.group(1)), {}).setdefault(tag, _clean(m.group(2)))
    return dict(sorted(items.items()))


_FULL_WIDTH = {letter: chr(ord(letter) + 0xFEE0) for letter in "ABCDE"}  # "Ａ" for "A"


def _option_marker(letter: str) -> re.Pattern:
    # "A. x", "A) x", "(A) x", "A: x", "A、x", "A．x" (letters and brackets half or full width) at the
    # start or after white space; "（A）x" anywhere (Chinese text has no spaces between options)
    x = f"[{letter}{_FULL_WIDTH[letter]}]"
    return re.compile(rf"(?:^|(?<=\s))[(（]?{x}\s*[.):、．：）]\s*|(?:^|(?<=\s))[(（]{x}[)）]\s*|（{x}）\s*")


_BULLET_RE = re.compile(r"(?m)^[ \t]*[-*•][ \t]+")


def parse_options(text: str) -> list[str] | None:
    """The texts of options A-D in order, or None unless there are exactly four (markdown bold and
    list bullets around the markers are dropped). An option whose text runs over several lines is
    refused: the lines after one option per line are text the LLM added, or part of the option, and
    which cannot be told."""
    text = _BULLET_RE.sub("", text.replace("**", ""))
    positions = []
    start = 0
    for letter in LETTERS + "E":
        m = _option_marker(letter).search(text, start)
        if m is None:
            break
        positions.append((m.start(), m.end()))
        start = m.end()
    if len(positions) != 4:
        return None
    if positions[0][0] != len(text) - len(text.lstrip()):
        return None  # text before "A." is not an option
    bounds = positions + [(len(text), len(text))]
    options = [text[bounds[i][1] : bounds[i + 1][0]].strip().rstrip(";,；，").strip() for i in range(4)]
    if any("\n" in o for o in options):
        return None
    return options


def _same_text(a: str, b: str) -> bool:
    return units(unicodedata.normalize("NFKC", a)) == units(unicodedata.normalize("NFKC", b))


_LETTER_ANSWER = re.compile(
    r"^(?i:option\s*|choice\s*)?(?:选项\s*)?[(（]?([A-D])[)）]?(?![A-Za-z])[\s.、．:：,，;；]*(.*)$", re.S
)
# "The answer is", "Correct answer:", "Answer -", "答案是", "正确答案：", "应选" before the answer itself
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+|right\s+|final\s+|best\s+)?answer\b\s*(?:is\b|should\s+be\b)?\s*[:：-]?"
    r"|(?:正确|最终)?答案\s*(?:应该是|应为|是|为)?\s*[:：]?|应?选择?(?=\s*[(（]?[A-Da-d](?![A-Za-z])))\s*",
    re.I,
)


def _strip_answer_prefix(answer: str) -> str:
    """The answer without markdown bold and an "The answer is" prefix (for answers that name an
    option or yes / no, where neither is part of what is kept)."""
    return _clean(_ANSWER_PREFIX.sub("", answer.replace("**", "").strip(), count=1))


def choice_answer(answer: str, options: list[str]) -> tuple[str | None, str, str]:
    """``(letter, "", "")`` for the option letter an answer names (``B``, ``(B)``, ``B. text``, ``Option
    B``, ``The answer is B``, ``答案：B``, an option's exact text); ``(None, reason, why)`` when it names
    none: reason ``answer_mismatch`` for a letter followed by text that is not that option's, else
    ``bad_answer``. An answer that names one option by its letter and another by its text (a bare ``A``
    when option B's text is "A") is ambiguous and names none (``bad_answer``)."""
    raw = unicodedata.normalize("NFKC", answer.strip())
    text = _strip_answer_prefix(raw)
    by_text = next(
        (
            LETTERS[i]
            for i, option in enumerate(options)
            if _same_text(raw, option) or _same_text(text, option)
        ),
        None,
    )
    if re.fullmatch(r"[(（]?[a-d][)）]?[.。]?", text):
        text = text.upper()
    m = _LETTER_ANSWER.match(text)
    by_letter, reason, why = None, "bad_answer", f"answer {answer!r} names none of the options A-D"
    if m:
        letter, rest = m.group(1), m.group(2).strip().rstrip(".。")
        if rest and rest != "选项" and not _same_text(rest, options[LETTERS.index(letter)]):
            reason, why = "answer_mismatch", f"answer {answer!r} names option {letter} but gives other text"
        else:
            by_letter = letter
    if by_text and by_letter and by_text != by_letter:
        return (
            None,
            "bad_answer",
            f"answer {answer!r} is ambiguous: option {by_letter} by its letter, {by_text} by its text",
        )
    if by_text or by_letter:
        return by_text or by_letter, "", ""
    return None, reason, why


_CLAUSE_END = re.compile(r"[,.;:!，。；：！]")


def judge_answer(answer: str, lang: str) -> str | None:
    """Yes / No (是 / 否 in Chinese) for an answer that is one of the yes or no words, after an
    ``Answer:`` prefix if any; a yes or no word followed by a reason ("Yes, the car is red.") counts as
    that word. Anything else ("Yes and no", "Probably") is None."""
    text = _strip_answer_prefix(unicodedata.normalize("NFKC", answer))
    word = re.sub(r"[\s.!。！,，]+$", "", text).strip().lower()
    if word not in YES and word not in NO:
        word = _CLAUSE_END.split(word, maxsplit=1)[0].strip()
    if word in YES:
        return "Yes" if lang == "en" else "是"
    if word in NO:
        return "No" if lang == "en" else "否"
    return None


def check_item(type_: str, n: int, tags: dict[str, str], lang: str, checks: Checks) -> Instruction | Reject:
    """One parsed item -> an Instruction, or the first check it fails."""
    question, answer = tags.get("Q", ""), tags.get("A")
    if not question or not units(question):
        return Reject("empty_question", f"item {n} has no question ({question!r})", n)
    if not answer:
        return Reject("missing_answer", f"item {n} has no <A{n}>", n)
    if _PLACEHOLDER_RE.search(question) or _FILLER_QUESTION_RE.match(question):
        return Reject("placeholder_left", f"question {question!r} still holds a placeholder", n)
    if answer.strip(" .。").lower() in _FILLER_ANSWERS:
        return Reject("placeholder_left", f"item {n}: answer {answer!r} is the format's filler", n)
    options: list[str] = []
    if type_ == "choice":
        parsed = parse_options(tags.get("C", ""))
        if parsed is None or not all(parsed):
            return Reject("bad_options", f"item {n}: expected options A-D, got {tags.get('C', '')!r}", n)
        if len({tuple(units(o)) for o in parsed}) < 4:
            return Reject("duplicate_options", f"item {n}: options repeat: {parsed}", n)
        letter, reason, why = choice_answer(answer, parsed)
        if letter is None:
            return Reject(reason, f"item {n}: {why}", n)
        answer, options = letter, parsed
    elif type_ == "judge":
        canonical = judge_answer(answer, lang)
        if canonical is None:
            return Reject("bad_answer", f"item {n}: judgement answer {answer!r} is not yes or no", n)
        answer = canonical
    elif type_ == "short" and len(units(answer)) > checks.max_short_units:
        return Reject(
            "answer_too_long",
            f"item {n}: short answer has {len(units(answer))} units (max {checks.max_short_units})",
            n,
        )
    elif type_ == "long" and len(units(answer)) < checks.min_long_units:
        return Reject(
            "answer_too_short",
            f"item {n}: long answer has {len(units(answer))} units (min {checks.min_long_units})",
            n,
        )
    return Instruction(type_, question, answer, options, n)


def check_response(
    type_: str, text: str, lang: str, checks: Checks
) -> tuple[list[Instruction], list[Reject]]:
    """Every item of one LLM response, checked; a response without any numbered question is one
    ``unparsable`` rejection."""
    items = parse_items(text)
    if not any("Q" in tags for tags in items.values()):
        snippet = " ".join(text.split())[:120]
        return [], [Reject("unparsable", f"no <Q1>...</Q1> items in the response: {snippet!r}")]
    kept: list[Instruction] = []
    rejected: list[Reject] = []
    for n, tags in items.items():
        out = check_item(type_, n, tags, lang, checks)
        (kept if isinstance(out, Instruction) else rejected).append(out)
    return kept, rejected


def question_shingles(question: str) -> set[tuple[str, ...]]:
    """Unit bigrams of a question (unigrams for one-unit questions), for near-duplicate checks."""
    u = units(question)
    n = min(2, len(u))
    return {tuple(u[i : i + n]) for i in range(len(u) - n + 1)} if u else set()


def is_near_duplicate(a: set, b: set, threshold: float) -> bool:
    return exact_jaccard(a, b) >= threshold
