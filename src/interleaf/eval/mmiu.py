"""MMIU (multimodal multi-image understanding): loader, official prompt, extraction and scores.

Sources (read, not copied): MMIUBenchmark/MMIU ``VLMEvalKit/test_models.py`` at 81722e6 (prompt),
OpenGVLab/MMIU ``evaluate.py`` and ``evaluate_correct.py`` at 36c48ec (extraction and metric).

Prompt: ``question + "\\n" + context`` for the 23 tasks of the official ``tasks_exist`` list,
``context + "\\n" + question`` for the others, then the official suffix; images are given as a list
before the text (for InternVL-style models: ``Image-1: <image>\\n`` ... prefix, VLMEvalKit's convention).

Extraction (``extract_choice``):
1. refusal/error responses (``image none``, ``model error or image error``, ``image error``,
   ``model error``, empty) -> ``Z``;
2. remove U+00A0 and strip leading/trailing ``.,()``; a single letter a..n -> that letter (case kept);
3. otherwise a judge model on an OpenAI-compatible endpoint with the official matching prompt
   (a failing judge call gives ``GPT error``, which the official metric drops from the denominator);
4. without a judge, a deterministic matcher (NOT the official method, reported as such):
   a leading option letter (``A.``, ``(B)``, ``C:``, ``Answer: D``) that names a valid option, else the
   one option whose normalised text is contained in the normalised response (the longest one if
   several nest, e.g. "red car" over "car"), else ``Z``.

Metric (``evaluate_correct.py``): a record is correct iff ``choice.strip().lower()`` is a substring of
``output.strip().lower()``; records with ``GPT error`` or no ``output`` are skipped; per-task accuracy;
overall = unweighted mean over tasks (the ``task`` field, 59 names; ``overall_paper_tasks`` merges
the 7 source-split pairs into the paper's 52 tasks). Also per relationship type (mean over its tasks,
plus micro), micro accuracy over all records, and random/frequency baselines computed from the data.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interleaf.errors import InputError, cannot_read

TASKS_EXIST = frozenset(
    {
        "person_reid", "multiple_image_captioning", "spot_the_similarity", "face_retrieval",
        "sketch2image_retrieval", "handwritten_retrieval", "spot_the_diff", "image2image_retrieval",
        "vehicle_retrieval", "text2image_retrieval", "general_action_recognition", "video_captioning",
        "next_img_prediction", "temporal_ordering", "meme_vedio_understanding",
        "action_quality_assessment", "temporal_localization", "mevis", "ravens_progressive_matrices",
        "threed_indoor_recognition", "point_tracking", "threed_cad_recognition", "single_object_tracking",
    }
)  # fmt: skip
SUFFIX = "\nPlease answer the option directly like A,B,C,D..."
LETTERS = frozenset("abcdefghijklmn")
CHOICES = frozenset(c.upper() for c in LETTERS)  # what a parsed answer is (Z: no option matched)
REFUSALS = frozenset({"image none", "model error or image error", "image error", "model error", ""})
MISSING_IMAGE_RESPONSE = "image none"
MODEL_ERROR_RESPONSE = "model error or image error"
JUDGE_ERROR = "GPT error"
REQUIRED_FIELDS = ("task", "options", "question", "context", "input_image_path", "output")
SCORE_FIELDS = ("task", "options", "question", "output")  # what scoring reads (besides the response)

RELATIONSHIPS = {
    "Low-level-semantic": ["forensic_detection_blink", "forensic_detection_forgerynet", "visual_quality_assessment_ve_lol_l"],
    "High-level-sub-semantic": ["casuality_reasoning_next_qa", "casuality_reasoning_var", "emotion_recognition_expw",
                                "emotion_recognition_findingemo", "multiple_image_captioning"],
    "High-level-obj-semantic": ["face_retrieval", "functional_correspondence_blink", "functional_correspondence_funk_point",
                                "handwritten_retrieval", "image2image_retrieval", "person_reid",
                                "semantic_correspondence_blink", "semantic_correspondence_misc210k",
                                "sketch2image_retrieval", "spot_the_similarity", "spot_the_diff",
                                "text2image_retrieval", "vehicle_retrieval", "visual_correspondence_blink",
                                "visual_correspondence_scannet", "visually_grounded_reasoning_marvl",
                                "visually_grounded_reasoning_nlvr2"],
    "Discrete-temporal": ["gui_app_recognition", "gui_next_action_prediction", "textual_cloze", "visual_cloze",
                          "visual_coherence", "visual_ordering"],
    "Continuous-temporal": ["action_quality_assessment", "general_action_recognition", "meme_vedio_understanding",
                            "mevis", "next_img_prediction", "temporal_localization", "temporal_ordering",
                            "video_captioning"],
    "2D-spatial": ["Homography_estimation", "Icon_Question_Answering_with_Spatial_Context",
                   "Image_Captioning_with_Spatial_Context", "Image_Spatial_Transformation_Estimation",
                   "Image_text_retrieval_with_Spatial_Context", "jigsaw_puzzle_solving", "point_tracking",
                   "ravens_progressive_matrices", "single_object_tracking"],
    "3D-spatial": ["Egocentric_Video_QuestionAnswering", "Multiview_Action_Recognition", "Multiview_reasoning",
                   "threed_cad_recognition", "threeD_Depth_Estimation", "threed_indoor_recognition",
                   "threeD_Object_Detection", "threeD_Object_Tracking", "threeD_Pose_Estimation",
                   "threeD_question_answering", "threeD_Scene_Reconstruction"],
}  # fmt: skip
TASK_RELATIONSHIP = {t: rel for rel, tasks in RELATIONSHIPS.items() for t in tasks}
# The 7 paper tasks whose records come from two sources (two ``task`` names each).
SPLIT_PAPER_TASKS = (
    "forensic_detection", "casuality_reasoning", "emotion_recognition", "functional_correspondence",
    "semantic_correspondence", "visual_correspondence", "visually_grounded_reasoning",
)  # fmt: skip
# Absolute prefix of the original release, mapped onto the local image root.
ORIGINAL_PREFIX = "/mnt/hwfile/gveval/mengfanqing/MMIU/"


def paper_task(task: str) -> str:
    for base in SPLIT_PAPER_TASKS:
        if task.startswith(base + "_"):
            return base
    return task


def relationship_of(record: dict) -> str:
    """Relationship type from the task list, else the first path component of the images."""
    rel = TASK_RELATIONSHIP.get(record.get("task", ""))
    if rel:
        return rel
    paths = record.get("input_image_path")
    for p in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []:
        parts = [x for x in str(p).replace(ORIGINAL_PREFIX, "").split("/") if x not in ("", ".")]
        if parts and parts[0] in RELATIONSHIPS:
            return parts[0]
    return "unknown"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field -> (predicate, what it must be); ``output`` may be null (the official metric skips it)
FIELD_TYPES = {
    "task": (lambda v: isinstance(v, str), "a string"),
    "question": (lambda v: isinstance(v, str), "a string"),
    "context": (lambda v: isinstance(v, str), "a string"),
    "options": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "input_image_path": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "output": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def field_problem(rec: dict, fields: Iterable[str]) -> str | None:
    """The first of ``fields`` that is missing (null, except ``output``) or wrong-typed, else None."""
    for key in fields:
        if key not in rec or (rec[key] is None and key != "output"):
            return f"has no field {key!r}"
        ok, want = FIELD_TYPES[key]
        if not ok(rec[key]):
            return f"field {key!r} must be {want}, got {type(rec[key]).__name__}"
    return None


def _flatten(rec: dict) -> dict:
    """The nested per-relationship layout -> the flat ``all.json`` layout."""
    if "input" in rec and isinstance(rec["input"], dict):
        inp, out = rec["input"], rec.get("output")
        flat = {k: v for k, v in rec.items() if k not in ("input", "output")}
        flat.update(
            question=inp.get("question"),
            context=inp.get("context"),
            input_image_path=inp.get("input_image_path"),
        )
        flat["output"] = out.get("output_text") if isinstance(out, dict) else out
        return flat
    return rec


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from exc
    if isinstance(data, dict):  # {"data": [...]} or a single record
        data = data.get("data", [data])
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of MMIU records")
    return data


def find_data(path: str | os.PathLike) -> tuple[list[Path], Path]:
    """A file, or a directory holding ``all.json``/``all.parquet`` or per-relationship JSONs.

    Returns (record files, image root).
    """
    p = Path(path)
    if p.is_file():
        return [p], p.parent
    if not p.is_dir():
        raise InputError(f"{p}: no such file or directory")
    for name in ("all.json", "all.parquet", "all.jsonl"):
        if (p / name).is_file():
            return [p / name], p
    nested = sorted(p.glob("*/*.json")) + sorted(p.glob("*.json"))
    if not nested:
        raise InputError(f"{p}: no all.json, all.parquet or per-relationship *.json found")
    return nested, p


@dataclass
class MMIUSample:
    """One MMIU question ready for a model."""

    id: str
    record: dict  # the flat record (kept whole for the predictions file)
    text: str  # the official prompt text, without image placeholders
    images: list[str]  # resolved image paths, in presentation order
    missing_images: list[str]
    relationship: str
    order: int = 0  # position in the loaded files (load errors included)


def build_text(record: dict) -> str:
    """The official prompt text (question/context order rule + answer suffix)."""
    question, context = str(record["question"]), str(record["context"])
    text = question + "\n" + context if record["task"] in TASKS_EXIST else context + "\n" + question
    return text + SUFFIX


def resolve_image(p: str, root: Path) -> Path:
    if p.startswith(ORIGINAL_PREFIX):
        p = p[len(ORIGINAL_PREFIX) :]
    path = Path(p)
    return path if path.is_absolute() else root / path


def load(path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    """Load MMIU records; returns (samples, errors) with errors as (id, reason, order) for unusable records."""
    files, root = find_data(path)
    root = Path(image_root) if image_root else root
    samples: list[MMIUSample] = []
    errors: list[tuple[str, str, int]] = []
    order = 0
    for file in files:
        prefix = "" if len(files) == 1 else f"{file.parent.name}/{file.stem}/"
        for i, raw in enumerate(_read_records(file)):
            order += 1
            sid = (
                str(raw.get("id", raw.get("index", f"{prefix}{i}")))
                if isinstance(raw, dict)
                else f"{prefix}{i}"
            )
            if not isinstance(raw, dict):
                errors.append((sid, f"{file}: record {i} is not an object", order))
                continue
            rec = _flatten(raw)
            problem = field_problem(rec, REQUIRED_FIELDS)  # a bad record is a per-sample error
            if problem:
                errors.append((sid, f"{file}: record {i} {problem}", order))
                continue
            paths = rec["input_image_path"]
            if isinstance(paths, str):
                paths = [paths]
            images = [str(resolve_image(str(x), root)) for x in paths]
            samples.append(
                MMIUSample(
                    id=sid,
                    record=rec,
                    text=build_text(rec),
                    images=images,
                    missing_images=[x for x in images if not os.path.exists(x)],
                    relationship=relationship_of(rec),
                    order=order,
                )
            )
    return samples, errors


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def strip_punctuation(text: str) -> str:
    """Leading/trailing ``.,()`` removed (evaluate.py:remove_punctuation)."""
    return re.sub(r"^[.,()]+|[.,()]+$", "", text)


def judge_prompt(question: str, options: str, prediction: str) -> str:
    """The official option-matching prompt (evaluate.py:build_prompt), text reproduced for fidelity."""
    return (
        "You are an AI assistant who will help me to match an answer with several options of a single-choice "
        "question. You are provided with a question, several options, and an answer, and you need to find which "
        "option is most similar to the answer. If the meaning of all options are significantly different from "
        "the answer, output Z. When the options are mostly numbers, if the model outputs numbers in the same "
        "format, please do not be too precise and try to match an answer as much as possible. Your should output "
        "a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
        "Example 1: \n"
        "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
        "Answer: a cute teddy bear\nYour output: A\n"
        "Example 2: \n"
        "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
        "Answer: Spider\nYour output: Z\n"
        "Example 3: \n"
        f"Question: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: "
    )


def parse_options(options: Any) -> dict[str, str]:
    """``"A: text\\nB: text"`` (or a list) -> {"A": "text", ...}."""
    if isinstance(options, (list, tuple)):
        return {chr(ord("A") + i): str(o) for i, o in enumerate(options)}
    out: dict[str, str] = {}
    for line in str(options or "").splitlines():
        m = re.match(r"\s*\(?([A-Z])\)?\s*[:.)]\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
        elif out and line.strip():  # a wrapped option continues on the next line
            last = next(reversed(out))
            out[last] += " " + line.strip()
    return out


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# An upper-case option letter at the start ("A.", "(B)", "C: ...", "Answer: D"); lower case is left
# alone there because "a car" starts with an article, not an option.
_LEADING_LETTER = re.compile(
    r"^\s*(?i:(?:the\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*)?\(?([A-N])\)?(?=[\s.:,)\]]|$)"
)


def match_option(prediction: str, options: dict[str, str]) -> str:
    """The deterministic fallback matcher (documented in the module docstring); 'Z' when unmatched."""
    m = _LEADING_LETTER.match(prediction)
    if m and m.group(1) in options:
        return m.group(1)
    pred = f" {_norm(prediction)} "
    hits = [(len(_norm(t)), k) for k, t in options.items() if _norm(t) and f" {_norm(t)} " in pred]
    if not hits:
        return "Z"
    hits.sort(reverse=True)
    if len(hits) > 1 and hits[0][0] == hits[1][0]:
        return "Z"  # two different options of the same length: ambiguous
    # several hits are fine only if the shorter ones are contained in the longest (e.g. "car" in "red car")
    longest = _norm(options[hits[0][1]])
    if all(f" {_norm(options[k])} " in f" {longest} " for _, k in hits[1:]):
        return hits[0][1]
    return "Z"


Judge = Callable[[str], str]  # prompt -> judge text; raises on failure


def extract_choice(record: dict, response: str, judge: Judge | None = None) -> tuple[str, str]:
    """(choice, method). method: refusal | letter | judge | judge_error | matcher."""
    prediction = (response or "").strip()
    if prediction in REFUSALS:
        return "Z", "refusal"
    prediction = strip_punctuation(prediction.replace("\u00a0", "").strip())
    if prediction.strip().lower() in LETTERS:
        return prediction.strip(), "letter"
    if judge is not None:
        try:
            return judge(judge_prompt(record["question"], record["options"], prediction)).strip(), "judge"
        except Exception:  # noqa: BLE001 - any judge failure is the official 'GPT error'
            return JUDGE_ERROR, "judge_error"
    return match_option(prediction, parse_options(record["options"])), "matcher"


def is_correct(choice: str, output: str) -> bool:
    """The official rule: the lower-cased choice is a substring of the lower-cased answer letter."""
    return choice.strip().lower() in output.strip().lower()


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _num_options(record: dict) -> int:
    return len(parse_options(record.get("options")))


def baselines(records: list[dict]) -> dict[str, float]:
    """Random guess (mean 1/#options) and frequency guess (most common answer) as macro over tasks."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("output") is not None:
            by_task[r["task"]].append(r)
    rand, freq = [], []
    for recs in by_task.values():
        rand.append(sum(1 / max(_num_options(r), 1) for r in recs) / len(recs))
        counts = Counter(str(r["output"]).strip().upper() for r in recs)
        freq.append(counts.most_common(1)[0][1] / len(recs))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"random": mean(rand), "frequency": mean(freq)}


def parallel_judge(judge: Judge, records: list[dict], workers: int = 10) -> Judge:
    """Ask ``judge`` about every prompt the records need, ``workers`` at a time (the official script
    uses a pool of 10); returns a judge that answers from those results (re-raising failures)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = []
    for rec in records:
        response = rec.get("response")
        if not isinstance(response, str) or response.strip() in REFUSALS:
            continue
        prediction = strip_punctuation(response.strip().replace("\u00a0", "").strip())
        if prediction.strip().lower() not in LETTERS:
            prompts.append(judge_prompt(rec.get("question"), rec.get("options"), prediction))
    unique = list(dict.fromkeys(prompts))

    def ask(prompt: str) -> str | Exception:
        try:
            return judge(prompt)
        except Exception as exc:  # noqa: BLE001 - re-raised by the lookup below
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = dict(zip(unique, pool.map(ask, unique)))

    def lookup(prompt: str) -> str:
        result = answers[prompt] if prompt in answers else ask(prompt)
        if isinstance(result, Exception):
            raise result
        return result

    return lookup


def score_problem(rec: Any) -> str | None:
    """Why a record cannot be scored at all (it is skipped and listed), None when it can."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    problem = field_problem(rec, SCORE_FIELDS)
    if problem and isinstance(rec.get("error"), str):
        return rec["error"]  # a run's row for a record it could not load: its own reason
    if problem:
        return problem
    if not isinstance(rec.get("response"), str):
        return "has no string field 'response'"
    return None


def is_parsed(rec: dict, choice: str, method: str) -> bool | None:
    """Whether an option was found in the response: not when the letter rule, the matcher or the
    judge leave ``Z`` (or the judge answers no letter). None when the model was never asked
    (``error``: missing image, model error) or the judge failed (counted as ``judge_error``)."""
    if "error" in rec or method == "judge_error":
        return None
    return choice.strip().upper() in CHOICES


def _record_id(rec: Any, index: int) -> Any:
    rid = rec.get("id", rec.get("index")) if isinstance(rec, dict) else None
    return rid if isinstance(rid, (int, str)) else f"record {index}"


def score(
    records: Iterable[dict], judge: Judge | None = None, judge_workers: int = 10
) -> tuple[dict, list[dict]]:
    """Score MMIU records carrying a ``response``; returns (scores, per-record rows).

    Records that already carry ``choice`` (e.g. a re-score of predictions.jsonl with the same
    extraction) are re-extracted all the same, so scores never depend on a stale choice. Judge
    calls run ``judge_workers`` at a time. A record that cannot be scored (missing or wrong-typed
    field, no string ``response``) is skipped and listed in ``skipped``, never raised; the others
    are scored as if it were absent. ``num_skipped`` counts every record outside the accuracy
    denominators (these, plus the official skips: judge errors and records without ``output``).
    """
    records = list(records)
    problems = [score_problem(r) for r in records]
    valid = [r for r, p in zip(records, problems) if p is None]
    if judge is not None and judge_workers > 1:
        judge = parallel_judge(judge, valid, judge_workers)
    rows = []
    skipped = []
    tasks: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # task -> [correct, count]
    unparsed: Counter = Counter()
    methods: Counter = Counter()
    for i, (rec, problem) in enumerate(zip(records, problems)):
        if problem is not None:
            skipped.append({"id": _record_id(rec, i), "error": problem})
            rows.append(
                {"choice": None, "extraction": None, "correct": None, "parsed": None, "skipped": problem}
            )
            continue
        choice, method = extract_choice(rec, rec["response"], judge)
        methods[method] += 1
        parsed = is_parsed(rec, choice, method)
        unparsed[rec["task"]] += parsed is False
        row = {"choice": choice, "extraction": method, "correct": None, "parsed": parsed}
        if choice.strip() != JUDGE_ERROR and rec["output"] is not None:
            ok = is_correct(choice, str(rec["output"]))
            row["correct"] = ok
            tasks[rec["task"]][0] += int(ok)
            tasks[rec["task"]][1] += 1
        rows.append(row)
    per_task = {
        t: {"accuracy": c / n, "correct": c, "count": n, "unparsable": unparsed[t]}
        for t, (c, n) in sorted(tasks.items())
    }
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    rel_tasks: dict[str, list[str]] = defaultdict(list)
    rel_of = {r["task"]: relationship_of(r) for r in valid}
    for t in per_task:
        rel_tasks[rel_of[t]].append(t)
    per_rel = {
        rel: {
            "accuracy": mean([per_task[t]["accuracy"] for t in ts]),
            "micro_accuracy": sum(per_task[t]["correct"] for t in ts) / sum(per_task[t]["count"] for t in ts),
            "tasks": len(ts),
            "count": sum(per_task[t]["count"] for t in ts),
        }
        for rel, ts in sorted(rel_tasks.items())
    }
    paper: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, s in per_task.items():
        paper[paper_task(t)][0] += s["correct"]
        paper[paper_task(t)][1] += s["count"]
    total_c = sum(s["correct"] for s in per_task.values())
    total_n = sum(s["count"] for s in per_task.values())
    extraction = (
        "official letter rule + judge"
        if judge is not None
        else "official letter rule + deterministic matcher"
    )
    scores = {
        "overall": mean([s["accuracy"] for s in per_task.values()]),
        "overall_paper_tasks": mean([c / n for c, n in paper.values()]),
        "micro_accuracy": total_c / total_n if total_n else 0.0,
        "num_tasks": len(per_task),
        "num_scored": total_n,
        "num_records": len(records),
        "num_skipped": len(records) - total_n,
        "skipped": {"count": len(skipped), "samples": skipped[:1000]},
        "unparsable": sum(unparsed.values()),  # responses in which no option was found
        "extraction": extraction,
        "extraction_counts": dict(methods),
        "per_relationship": per_rel,
        "per_task": per_task,
        "baselines": baselines(valid),
    }
    return scores, rows
