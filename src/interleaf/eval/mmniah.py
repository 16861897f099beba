"""MM-NIAH (Needle In A Multimodal Haystack): loader, official prompts and the official scorer.

Everything here follows OpenGVLab/MM-NIAH at commit 2fd03dd:

- prompts as ``utils/tools.py:get_input`` (text choices, image choices, short-answer suffix) and
  ``eval_internvl.py`` (``context + "\\n" + question``, one 448 tile per image, 32 new tokens for
  counting and 16 otherwise);
- correctness as ``calculate_scores.py:is_correct`` (multiple-choice parsing, counting soft accuracy
  with dicts flattened, VQA normalisation + whole-word match);
- binning as ``calculate_scores.py``: 11 context-length bins 1K..64K via ``np.digitize`` (samples
  under 1K dropped), 5 needle-depth bins of 0.2, empty cells scored 0, per-task score per length bin
  = mean over the 5 depth cells, rounded to 6 decimals; benchmark overall per bin = mean over the six
  tasks (only when all six are present). Per-task and benchmark "overall" = mean over the 11 bins,
  as the paper's tables.

Result files use the official layout ``<model>_<task>-<split>.jsonl`` with one JSON object per line:
``question_id, question, answer, response, context_length, placed_depth``.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.errors import InputError, cannot_read, is_number

TASKS = (
    "retrieval-text",
    "retrieval-image",
    "counting-text",
    "counting-image",
    "reasoning-text",
    "reasoning-image",
)
# Order matters: a name ending in "rag-val" also ends in "val" (the official scorer checks this order).
SPLITS = ("rag-val", "val", "rag-test", "test")
X_BINS = [1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000]
CONTEXT_RANGES = [f"{b // 1000}k" for b in X_BINS]
DEPTH_INTERVAL = 0.2
N_DEPTH = int(1 / DEPTH_INTERVAL)
IMAGE_PLACEHOLDER = "<image>"
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
REQUIRED_FIELDS = ("id", "images_list", "context", "question", "answer", "meta")
REQUIRED_META = ("placed_depth", "context_length")


# --------------------------------------------------------------------------------------------
# VQA answer normalisation (the VQAv2 rules MM-NIAH's utils/tools.py:VQAEval applies)
# --------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The upstream pattern reads like a look-behind but is a look-ahead for the literal "<=" + digit; it is
# kept byte for byte so that normalisation matches. Upstream also passes re.UNICODE (32) as the
# ``count`` argument of ``sub``, so at most 32 periods are removed: reproduced below.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """Whitespace, punctuation, number words, articles and contractions as the VQAv2 evaluator."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _has_word(sentence: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", sentence) is not None


def vqa_match(response: str, answer: Any) -> int:
    """1 if a (normalised) ground-truth answer occurs as a whole word in the normalised response."""
    norm = vqa_normalize(response)
    answers = answer if isinstance(answer, list) else [answer]
    return int(any(_has_word(norm, vqa_normalize(str(a))) for a in answers))


# --------------------------------------------------------------------------------------------
# Correctness (calculate_scores.py:is_correct)
# --------------------------------------------------------------------------------------------


def _mc_choice(response: str) -> int | None:
    """The option index the official multiple-choice parser reads, None where it finds none.

    Raises InputError for a digit string ``int()`` cannot read (``'²'`` passes ``isdigit``): the
    official scorer stops on it with a ValueError, so the record has no official score.
    """
    if response.isdigit():
        try:
            return int(response)
        except ValueError:
            raise InputError(
                f"response {response!r} is a digit string int() cannot read (the official scorer stops on it)"
            ) from None
    response = response.lower().replace("the answer is", "").replace("*", "")
    if "." in response:
        response = response.split(".")[0].replace(",", "").strip()
    response = response.strip()
    if response == "none":
        return None
    if "the camera is moving left" in response:
        response = "a"
    elif "the camera is moving right" in response:
        response = "b"
    if len(response) != 1:
        return None
    return ord(response) - ord("a")


def _mc_correct(answer: int, response: str) -> float:
    choice = _mc_choice(response)
    return float(choice is not None and choice == answer)


def _counting_list(response: str) -> list | tuple | None:
    """The list the official counting parser reads (dicts flattened), None where it finds none."""
    try:
        parsed = json.loads(response.replace("json", "").replace("```", "").strip())
        if isinstance(parsed, dict):
            parsed = sum(list(parsed.values()), start=[])
    except Exception:  # noqa: BLE001 - any unparsable answer scores 0, as upstream
        return None
    return parsed if isinstance(parsed, (list, tuple)) else None


def _counting_correct(answer: list, response: str) -> float:
    parsed = _counting_list(response)
    if parsed is None:
        return 0.0
    if not answer:  # upstream: match / len(answer) -> ZeroDivisionError, only once a list is parsed
        raise InputError("answer is an empty list (the official scorer divides by zero on it)")
    match = sum(1 for pred, gt in zip(parsed, answer) if pred == gt)
    return match / len(answer)


def is_correct(answer: Any, response: str) -> float:
    """Score one response in [0, 1] exactly as the official MM-NIAH scorer.

    ``answer``: int (option index) for multiple choice, list for counting (soft accuracy), str for
    open answers. ``response``: the model's text.
    """
    response = response.strip(".")
    if isinstance(answer, bool):  # bool is an int in Python but never an MM-NIAH answer
        answer = int(answer)
    if isinstance(answer, int):
        return _mc_correct(answer, response)
    if isinstance(answer, list):
        return _counting_correct(answer, response)
    return float(vqa_match(response, answer))


def is_parsed(answer: Any, response: str) -> bool | None:
    """Whether the official parser reads an answer from ``response`` (what ``is_correct`` scores).

    Multiple choice: an option letter or number; counting: a JSON list. Open short answers are
    matched as whole words anywhere in the response, so they have no notion of unparsable: None.
    """
    response = response.strip(".")
    if isinstance(answer, bool):
        answer = int(answer)
    if isinstance(answer, int):
        try:
            return _mc_choice(response) is not None
        except InputError:
            return False
    if isinstance(answer, list):
        return _counting_list(response) is not None
    return None


# --------------------------------------------------------------------------------------------
# Bins and scores (calculate_scores.py:main)
# --------------------------------------------------------------------------------------------


def length_bin(context_length: float) -> int:
    """np.digitize(x, X_BINS): 0 for < 1K (dropped), 1..11 for the bins 1K..64K."""
    return bisect.bisect_right(X_BINS, context_length)


def depth_value(placed_depth: float | list[float]) -> float:
    if isinstance(placed_depth, list):
        if not placed_depth:
            raise InputError("placed_depth is an empty list")
        return sum(placed_depth) / len(placed_depth)
    return float(placed_depth)


def depth_bin(placed_depth: float | list[float]) -> int:
    """Needle depth bin 0..4: mean depth, 1.0 -> 0.99, ``int(depth / 0.2)``.

    A bin outside 0..4 raises InputError: upstream indexes its 5-column grid with it, so a mean depth
    above 1 stops it (IndexError) and one of -0.2 or below lands in another depth's column (a negative
    index; -0.5 is counted at depth 0.6) or stops it. Depths in (-0.2, 0) truncate to bin 0 as upstream.
    """
    y = depth_value(placed_depth)
    if y == 1.0:
        y = 0.99
    b = int(y / DEPTH_INTERVAL)
    if not 0 <= b < N_DEPTH:
        raise InputError(f"placed_depth {placed_depth!r}: needle depth outside [0, 1] (no depth bin)")
    return b


@dataclass
class TaskScore:
    """The score grid of one result file: ``grid[length_bin][depth_bin]`` over the 11 kept bins."""

    model: str
    task: str  # e.g. "retrieval-text"
    split: str  # e.g. "val"
    scores: list[float]  # 11 per-length-bin scores (mean over depth bins, rounded to 6 decimals)
    grid: list[list[float]]  # [11][5] cell accuracies (empty cells 0)
    counts: list[list[int]]  # [11][5] samples per cell
    n_samples: int
    n_dropped_short: int  # samples under 1K tokens (dropped, as upstream)
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"id", "error"} of records that cannot be scored
    # responses the official parser reads no answer from (multiple choice, counting); None for
    # open short answers, which have no notion of unparsable
    n_unparsed: int | None = None

    @property
    def overall(self) -> float:
        return sum(self.scores) / len(self.scores)


def task_answer(task: str, answer: Any) -> Any:
    """Counting answers stored as JSON strings are decoded first (as upstream)."""
    if "counting" in task and not isinstance(answer, list):
        try:
            return json.loads(answer)
        except (TypeError, ValueError) as exc:
            raise InputError(f"counting answer is not a JSON list: {answer!r}") from exc
    return answer


# --------------------------------------------------------------------------------------------
# Field types: checked before a record is asked or scored, so one bad record never stops a run
# --------------------------------------------------------------------------------------------


def _is_depth(v: Any) -> bool:
    return is_number(v) or (isinstance(v, list) and bool(v) and all(is_number(x) for x in v))


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field check = (predicate, what the field must be)
_STR = (lambda v: isinstance(v, str), "a string")
_STR_LIST = (_is_str_list, "a list of strings")
_OPT_STR_LIST = (lambda v: v is None or _is_str_list(v), "a list of strings or null")
_NUMBER = (is_number, "a number")
_DEPTH = (_is_depth, "a number or a non-empty list of numbers")
_ID = (lambda v: _is_index(v) or isinstance(v, str), "an int or a string")
RECORD_TYPES = {"id": _ID, "images_list": _STR_LIST, "context": _STR, "question": _STR}
META_TYPES = {
    "context_length": _NUMBER,
    "placed_depth": _DEPTH,
    "choices": _OPT_STR_LIST,
    "choices_image_path": _OPT_STR_LIST,
}
RESULT_TYPES = {"context_length": _NUMBER, "placed_depth": _DEPTH}


def _type_problem(name: str, value: Any, check: tuple) -> str | None:
    ok, want = check
    return None if ok(value) else f"field {name!r} must be {want}, got {type(value).__name__}"


def _is_count_answer(task: str, answer: Any) -> bool:
    try:
        return isinstance(task_answer(task, answer), list)
    except InputError:
        return False


def answer_problem(task: str, answer: Any, multiple_choice: bool = False) -> str | None:
    """Why ``answer`` cannot be scored for ``task`` (counting: a list or JSON list string;
    multiple choice: an option index; else an int, string or list), None when it can."""
    if "counting" in task:
        check = (lambda a: _is_count_answer(task, a), "a list (or a JSON list string) for counting")
    elif multiple_choice:
        check = (_is_index, "an option index (int)")
    else:
        check = (lambda a: _is_index(a) or isinstance(a, (str, list)), "an int, a string or a list")
    return _type_problem("answer", answer, check)


def result_problem(entry: Any, task: str) -> str | None:
    """Why one result record cannot be scored (naming the field), None when it can."""
    if not isinstance(entry, dict):
        return "record is not a JSON object"
    for key in ("answer", "response", "context_length", "placed_depth"):
        if key not in entry:
            return f"no field {key!r}"
    for key, check in RESULT_TYPES.items():
        if problem := _type_problem(key, entry[key], check):
            return problem
    if problem := _type_problem("response", entry["response"], _STR):  # upstream: response.strip
        return problem
    return answer_problem(task, entry["answer"])


def _record_id(entry: Any, index: int) -> Any:
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return qid if isinstance(qid, (int, str)) else f"record {index}"


def score_records(records: Iterable[dict], task: str, model: str = "model", split: str = "val") -> TaskScore:
    """Score result records (``answer``, ``response``, ``context_length``, ``placed_depth``).

    A record that cannot be scored (missing or wrong-typed field) is skipped and listed in
    ``skipped``, never raised: the official scorer would stop on it, so it has no official score.
    Records carrying an ``error`` (the model was never asked) are scored as upstream but get no
    parse flag, so ``n_unparsed`` counts only answers the model gave.
    """
    import numpy as np

    total = np.zeros((len(X_BINS) + 1, N_DEPTH))
    correct = np.zeros((len(X_BINS) + 1, N_DEPTH))
    warnings: list[str] = []
    skipped: list[dict] = []
    n = 0
    n_unparsed: int | None = None
    for i, entry in enumerate(records):
        problem = result_problem(entry, task)
        if problem is None:
            response = entry["response"]
            try:
                answer = task_answer(task, entry["answer"])
                x, y = length_bin(entry["context_length"]), depth_bin(entry["placed_depth"])
                value = is_correct(answer, response)
            except Exception as exc:  # noqa: BLE001 - one bad record is reported, never fatal
                problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if problem is not None:
            skipped.append({"id": _record_id(entry, i), "error": problem})
            continue
        total[x][y] += 1
        correct[x][y] += value
        n += 1
        parsed = is_parsed(answer, response)
        if parsed is not None:  # a task with a parser: count the answers the model gave
            n_unparsed = (n_unparsed or 0) + int(not parsed and "error" not in entry)
    result = np.divide(correct, total, out=np.zeros_like(correct), where=total != 0)
    kept = result[1:]  # [11, 5]; bin 0 (< 1K tokens) is dropped
    scores = [round(v, 6) for v in kept.T.mean(axis=0).tolist()]
    return TaskScore(
        model=model,
        task=task,
        split=split,
        scores=scores,
        grid=kept.tolist(),
        counts=total[1:].astype(int).tolist(),
        n_samples=n,
        n_dropped_short=int(total[0].sum()),
        warnings=warnings,
        skipped=skipped,
        n_unparsed=n_unparsed,
    )


def parse_result_name(path: str | os.PathLike) -> tuple[str, str, str]:
    """``<model>_<task>-<split>.jsonl`` -> (model, task, split)."""
    name = Path(path).name
    if not name.endswith(".jsonl") or "_" not in name:
        raise InputError(f"{path}: result file name must look like <model>_<task>-<split>.jsonl")
    model, task_split = name[: -len(".jsonl")].rsplit("_", 1)
    for split in SPLITS:
        if task_split.endswith("-" + split):
            return model, task_split[: -len(split) - 1], split
    raise InputError(f"{path}: no split (one of {', '.join(SPLITS)}) at the end of the file name")


def read_jsonl(path: str | os.PathLike, bad: list[dict] | None = None) -> list[dict]:
    """The JSON lines of ``path``. Without ``bad`` any invalid line raises; with it, invalid lines
    are listed there (``{"id": "line N", "error"}``) and skipped, and only a file with no valid
    line at all raises."""
    records = []
    invalid: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    if bad is None:
                        raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                    invalid.append({"id": f"line {lineno}", "error": f"not valid JSON ({exc.msg})"})
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from exc
    if invalid and not records:
        raise InputError(f"{path}: not JSON lines ({invalid[0]['id']}: {invalid[0]['error']})")
    if bad is not None:
        bad.extend(invalid)
    return records


def score_files(paths: Iterable[str | os.PathLike]) -> dict:
    """Score official result files; returns ``{model: {split: {...}}}``.

    Per split: ``tasks`` = ``{task: {"scores": [11], "overall": mean, "skipped", "unparsable"}}``
    plus, when all six tasks are present, ``overall`` = ``{"scores": [11 per-bin means over
    tasks], "overall": mean}``, ``unparsable`` (the total) and ``context_ranges`` (the bin labels).
    """
    grouped = collect(paths)
    return {
        model: {split: split_summary(ts) for split, ts in splits.items()} for model, splits in grouped.items()
    }


def collect(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, list[TaskScore]]]:
    """Score each result file; bad lines and records are skipped and reported in the TaskScore, a
    file with no scorable record at all is an error."""
    grouped: dict[str, dict[str, list[TaskScore]]] = {}
    for path in paths:
        model, task, split = parse_result_name(path)
        bad: list[dict] = []
        ts = score_records(read_jsonl(path, bad), task=task, model=model, split=split)
        ts.skipped[:0] = bad
        if not ts.n_samples:
            why = f" ({ts.skipped[0]['id']}: {ts.skipped[0]['error']})" if ts.skipped else ""
            raise InputError(f"{path}: no scorable record{why}")
        grouped.setdefault(model, {}).setdefault(split, []).append(ts)
    return grouped


def split_summary(task_scores: list[TaskScore]) -> dict:
    """Per-task and (with all six tasks) benchmark scores of one model on one split."""
    import numpy as np

    tasks = {}
    for ts in task_scores:
        tasks[ts.task] = {
            "scores": ts.scores,
            "overall": ts.overall,
            "n_samples": ts.n_samples,
            "n_dropped_short": ts.n_dropped_short,
            "unparsable": ts.n_unparsed,  # None: open short answers (no notion of unparsable)
            "skipped": {"count": len(ts.skipped), "samples": ts.skipped[:1000]},
        }
        if ts.warnings:
            tasks[ts.task]["warnings"] = ts.warnings
    summary: dict[str, Any] = {
        "tasks": tasks,
        "unparsable": sum(ts.n_unparsed or 0 for ts in task_scores),
        "context_ranges": CONTEXT_RANGES,
    }
    if len(task_scores) == len(TASKS):
        per_bin = np.array([ts.scores for ts in task_scores]).mean(axis=0).tolist()
        summary["overall"] = {
            "scores": [round(v, 6) for v in per_bin],
            "overall": float(np.mean([ts.overall for ts in task_scores])),
        }
    return summary


def official_scores_json(task_scores: list[TaskScore]) -> dict:
    """The official ``scores_<split>.json`` content: ``{"<task>-<split>": [11], "overall": [11], ...}``."""
    import numpy as np

    res: dict[str, Any] = {f"{ts.task}-{ts.split}": ts.scores for ts in task_scores}
    if len(task_scores) == len(TASKS):
        # .tolist() first, as upstream's save(): round() of a np.float64 rounds half-way cases
        # differently from round() of a float (0.566667 / 6 -> 0.094444 instead of 0.094445)
        per_bin = np.array([ts.scores for ts in task_scores]).mean(axis=0).tolist()
        res["overall"] = [round(v, 6) for v in per_bin]
    res["context_ranges"] = CONTEXT_RANGES
    return res


# --------------------------------------------------------------------------------------------
# Loader and prompts (utils/tools.py:get_input, eval_internvl.py)
# --------------------------------------------------------------------------------------------


@dataclass
class NiahSample:
    """One MM-NIAH question, ready for a model: ``prompt`` holds one ``<image>`` per image."""

    id: int | str
    task: str
    prompt: str  # context + "\n" + question-with-choices
    question: str  # the question with choices and suffix (what the official result file stores)
    images: list[str]  # absolute paths, in placeholder order (option images last)
    answer: Any
    context_length: int
    placed_depth: float | list[float]
    max_new_tokens: int


def check_record(rec: Any, where: str, task: str = "") -> None:
    """Raise an InputError naming the first missing or wrong-typed field the loader, the prompt
    builder or the scorer uses (so a bad record is a per-sample error, not a crash later)."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: record is not a JSON object")
    for key in REQUIRED_FIELDS:
        if key not in rec:
            raise InputError(f"{where}: missing field {key!r}")
    if not isinstance(rec["meta"], dict):
        raise InputError(f"{where}: field 'meta' is not an object")
    for key in REQUIRED_META:
        if key not in rec["meta"]:
            raise InputError(f"{where}: missing field 'meta.{key}'")
    problem = record_problem(rec, task)
    if problem:
        raise InputError(f"{where}: {problem}")


def record_problem(rec: dict, task: str) -> str | None:
    """The first wrong-typed field of an annotation record (all fields present), None when fine."""
    meta = rec["meta"]
    for key, check in RECORD_TYPES.items():
        if problem := _type_problem(key, rec[key], check):
            return problem
    for key, check in META_TYPES.items():
        if problem := _type_problem(f"meta.{key}", meta.get(key), check):
            return problem
    multiple_choice = bool(meta.get("choices") or meta.get("choices_image_path"))
    return answer_problem(task, rec["answer"], multiple_choice)


def build_input(rec: dict) -> tuple[str, list[str], str, Any]:
    """(context, images_list, question, answer) as the official ``get_input``."""
    images = list(rec["images_list"])
    context, question, answer, meta = rec["context"], rec["question"], rec["answer"], rec["meta"]
    choices, choice_images = meta.get("choices"), meta.get("choices_image_path")
    n_placeholders = context.count(IMAGE_PLACEHOLDER) + question.count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(images):
        raise InputError(f"{n_placeholders} <image> placeholders but {len(images)} entries in images_list")
    if choices and choice_images:
        raise InputError("both meta.choices and meta.choices_image_path are set")
    if choices:  # retrieval-image: text options
        for i, c in enumerate(choices):
            question = f"{question}\n{chr(i + ord('A'))}. {c}"
        question += MC_SUFFIX
    elif choice_images:  # reasoning-image: image options
        for i, c in enumerate(choice_images):
            question = f"{question}\n{chr(i + ord('A'))}. {IMAGE_PLACEHOLDER}"
            images.append(c)
        question += MC_SUFFIX
    else:  # counting and open short answers share the suffix upstream
        question += SHORT_SUFFIX
    return context, images, question, answer


def max_new_tokens_for(task: str) -> int:
    return 32 if "counting" in task else 16


def load_task(annotation: str | os.PathLike, image_root: str | os.PathLike, task: str | None = None):
    """Load one official ``<task>.jsonl``; returns (samples, errors) where errors are (id, reason)."""
    annotation = Path(annotation)
    task = task or annotation.stem
    samples: list[NiahSample] = []
    errors: list[tuple[str, str]] = []
    with open(annotation, "rb") as f:  # decoded line by line: a bad line is that sample's error
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{annotation}:{lineno}"
            try:
                rec = json.loads(line.decode("utf-8"))
                check_record(rec, where, task)
                context, images, question, answer = build_input(rec)
            except (json.JSONDecodeError, UnicodeDecodeError, InputError) as exc:
                sid = f"line{lineno}"
                bad = "invalid UTF-8" if isinstance(exc, UnicodeDecodeError) else "invalid JSON"
                errors.append((sid, str(exc) if isinstance(exc, InputError) else f"{where}: {bad}"))
                continue
            samples.append(
                NiahSample(
                    id=rec["id"],
                    task=task,
                    prompt=f"{context}\n{question}",
                    question=question,
                    images=[str(Path(image_root) / p) for p in images],
                    answer=answer,
                    context_length=rec["meta"]["context_length"],
                    placed_depth=rec["meta"]["placed_depth"],
                    max_new_tokens=max_new_tokens_for(task),
                )
            )
    return samples, errors


def find_split_dir(path: str | os.PathLike) -> tuple[Path, Path, str]:
    """An MM-NIAH split -> (annotations dir, images dir, split name).

    ``path`` is a split directory (``annotations/<task>.jsonl`` + ``images/``, e.g. ``mm_niah_val``),
    or its ``annotations`` directory. The split name comes from the directory name (``test``/``val``,
    ``rag-`` prefixed when it contains ``rag``).
    """
    root = Path(path)
    if root.name == "annotations" and root.is_dir():
        root = root.parent
    ann = root / "annotations"
    if not ann.is_dir():
        raise InputError(f"{root}: no annotations/ directory (expected an MM-NIAH split like mm_niah_val/)")
    split = "test" if "test" in root.name else "val"
    if "rag" in root.name:
        split = "rag-" + split
    return ann, root / "images", split


def result_record(sample: NiahSample, response: str) -> dict:
    """One line of an official result file."""
    return {
        "question_id": sample.id,
        "question": sample.question,
        "answer": sample.answer,
        "response": response,
        "context_length": sample.context_length,
        "placed_depth": sample.placed_depth,
    }
