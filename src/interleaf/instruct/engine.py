"""``interleaf instruct generate``: image captions -> checked, deduplicated instruction data.

MMInstruct's step (d): for every caption and instruction type (judgement, multiple choice, long
VQA, short VQA) an LLM on any OpenAI-compatible endpoint is given the caption, the image's prior
knowledge and up to three seed questions of the caption's domain, and writes new questions with
answers in the tag format (``interleaf.instruct.parse``). Each item is checked, near-duplicate
questions of one image are dropped, and the rest become fine-tuning samples in InternVL's format.

Flow, as small steps with counts:

    read captions (bad records, missing or unreadable images, duplicate images -> rejected)
    -> prompts (seeds sampled reproducibly per caption and type)
    -> LLM, each answer committed to a SQLite store as it arrives (a rerun asks only for the rest)
    -> parse + check each item -> dedup per image and type -> write

Outputs in OUT (written whole at the end, so a killed run leaves the previous ones or none):
``instructions.jsonl`` (``{"id", "image", "conversations", "type", "domain", "caption_id"}``),
``meta.json`` (the meta file ``interleaf train`` reads), ``rejected.jsonl`` (one line per dropped
caption, failed request or rejected item, with a reason code), ``stats.json`` and
``responses.sqlite`` (the store).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.endpoint import EndpointError, OpenAIClient, parse_openai_spec
from interleaf.errors import InputError, cannot_read
from interleaf.files import jsonl_text, replace_text
from interleaf.instruct.parse import (
    LETTERS,
    Checks,
    Instruction,
    check_response,
    is_near_duplicate,
    question_shingles,
)
from interleaf.instruct.seeds import TYPES, SeedBank
from interleaf.store import ResponseStore, file_digest, request_key

ITEMS_PER_REQUEST = {"judge": 4, "choice": 3, "long": 3, "short": 3}
SEEDS_PER_PROMPT = 3
SYSTEM_MESSAGE = "You write precise questions and answers about images, grounded in their descriptions."
DEFAULT_DOMAIN = "image_description"


# ----------------------------------------------------------------------------------------------------
# records


@dataclass
class Caption:
    """A caption record: the image (as written in the file, and resolved), its description, domain
    and prior knowledge (e.g. the image's title; "Empty" when none, as the official prompts say)."""

    id: str
    image: str
    path: str
    caption: str
    domain: str
    prior: str = "Empty"
    digest: str = ""


@dataclass
class Rejected:
    """One line of ``rejected.jsonl``."""

    stage: str  # "caption" | "task" (a caption and type not asked) | "request" | "item"
    reason: str
    detail: str
    caption_id: str | None = None
    type: str | None = None
    item: int | None = None
    response: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def first_field(record: dict, names: Sequence[str]) -> Any:
    """The first of ``names`` the record sets (a null counts as unset)."""
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return None


def _kind(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else type(value).__name__


def record_id(rec: dict, where: str) -> tuple[str, str | None]:
    """A record's id (a string, or an integer written as one; ``where`` when it has none), and what
    is wrong with it: a list, an object, a float or a bool is not an id (``str()`` of one is no
    stable key, and ``1`` and ``True`` would both be ids)."""
    value = rec.get("id")
    if value is None:
        return where, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if isinstance(value, str) and value.strip():
        return value, None
    return where, f"field 'id' must be a non-empty string or an integer, got {_kind(value)}"


def text_field_problem(name: str, value: Any, what: str) -> str | None:
    """What is wrong with a field that must hold text: missing, or not (non-blank) text."""
    if value is None or value == "":
        return f"field '{name}' ({what}) is missing"
    if not isinstance(value, str) or not value.strip():
        return f"field '{name}' must be {what}, got {_kind(value)}"
    return None


def record_domain(rec: dict, default: str | None) -> tuple[str, str | None]:
    """A record's domain (``default``, else image_description, when it has none), and what is wrong
    with it when it is not a string."""
    value = rec.get("domain")
    if value is None or value == "":
        return default or DEFAULT_DOMAIN, None
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    return default or DEFAULT_DOMAIN, f"field 'domain' must be a string, got {_kind(value)}"


def _decode(raw: bytes) -> tuple[Any, str | None]:
    """One JSON value from a line's bytes, or why not."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"


def iter_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line, record, error)`` for a JSONL file or a JSON list (``line`` is the item's index there).

    JSONL is read a line at a time (a file of any size); a line that is not UTF-8, not JSON or not an
    object is one bad record, never the end of the run. A file is a JSON list when its first line is
    not a JSON value on its own (a list laid out over lines) or is the file's only line; a JSONL file
    whose first record happens to be a list stays JSONL. A UTF-8 byte order mark is skipped."""
    try:
        with open(path, "rb") as f:
            first = f.readline().removeprefix(b"\xef\xbb\xbf")
            while first and not first.strip():
                first = f.readline()
            rest_empty = not f.read(1 << 16).strip()
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if first.lstrip().startswith(b"["):
        value, error = _decode(first)
        if error is not None or (rest_empty and isinstance(value, list)):
            yield from _list_records(path)
            return
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                if i == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue
                item, error = _decode(raw)
                if error is not None:
                    yield i, None, error
                elif not isinstance(item, dict):
                    yield i, None, f"expected an object, got {type(item).__name__}"
                else:
                    yield i, item, None
    except OSError as exc:
        raise cannot_read(path, exc) from None


def _list_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    for i, item in enumerate(data, 1):  # items are records as they stand: a string is not parsed again
        if not isinstance(item, dict):
            yield i, None, f"expected an object, got {type(item).__name__}"
            continue
        yield i, item, None


def record_fields(
    rec: dict, where: str, domain: str | None, seen_ids: set[str], need_caption: bool
) -> tuple[str, str, Any, Any, str | None]:
    """(id, domain, image, caption, problem) of a record; ``problem`` names the first bad field (an id
    in ``seen_ids``, which takes the id when the record is good, counts as one)."""
    cid, problem = record_id(rec, where)
    dom, dom_problem = record_domain(rec, domain)
    image = first_field(rec, ("image", "image_path"))
    text = first_field(rec, ("caption", "gpt4v_caption_interface"))
    if problem is None and cid in seen_ids:
        problem = f"id {cid!r} repeats an earlier record's"
    problem = (
        problem
        or text_field_problem("image", image, "a path")
        or (text_field_problem("caption", text, "a non-empty string") if need_caption else None)
        or dom_problem
    )
    if problem is None:
        seen_ids.add(cid)
    return cid, dom, image, text, problem


def open_record_image(
    image: str, root: Path, where: str, cid: str, seen: dict[str, str], opener: Callable[[str], Any]
) -> tuple[str, str, Any] | Rejected:
    """A record's image: (resolved path, content digest, ``opener(path)``), or why it is rejected -
    missing, unreadable (``opener`` raised InputError) or the same bytes as an earlier record's
    (``seen``: digest -> that image, updated here)."""
    path = image if os.path.isabs(image) else os.path.join(root, image)
    try:
        opened = opener(path)
    except InputError as exc:
        reason = "missing_image" if not os.path.exists(path) else "bad_image"
        return Rejected("caption", reason, f"{where}: {exc}", cid)
    digest = file_digest(path)
    if digest in seen:
        detail = f"{where}: image {image} has the same bytes as {seen[digest]}"
        return Rejected("caption", "duplicate_image", detail, cid)
    seen[digest] = f"{image} (record {cid!r})"
    return path, digest, opened


@dataclass
class UsableRecord:
    """A record whose fields are good and whose image opened and is new."""

    where: str
    record: dict
    id: str
    domain: str
    image: str
    caption: Any
    path: str
    digest: str
    opened: Any  # what the opener returned


def usable_records(
    records: Iterable[tuple[str, dict | None, str | None]],
    root: Path,
    domain: str | None,
    opener: Callable[[str], Any],
    rejected: list[Rejected],
    need_caption: bool,
) -> Iterator[UsableRecord]:
    """The records (``(where, record or None, why not)``) worth asking about, in order; each other
    record becomes one ``caption``-stage rejection in ``rejected``: unreadable, a bad field, an image
    missing, unreadable or repeating an earlier one's bytes."""
    seen_ids: set[str] = set()
    seen_images: dict[str, str] = {}
    for where, rec, error in records:
        if rec is None:
            rejected.append(Rejected("caption", "bad_record", f"{where}: {error}", where))
            continue
        cid, dom, image, text, problem = record_fields(rec, where, domain, seen_ids, need_caption)
        if problem:
            rejected.append(Rejected("caption", "bad_record", f"{where}: {problem}", cid))
            continue
        opened = open_record_image(image, root, where, cid, seen_images, opener)
        if isinstance(opened, Rejected):
            rejected.append(opened)
            continue
        yield UsableRecord(where, rec, cid, dom, image, text, *opened)


def read_captions(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    domain: str | None = None,
    limit: int | None = None,
) -> tuple[list[Caption], list[Rejected]]:
    """Caption records from JSONL / a JSON list. Fields: ``image`` | ``image_path`` (relative to
    ``image_root``, default the file's folder), ``caption`` | ``gpt4v_caption_interface`` (the
    official caption field), optional ``id``, ``domain`` (default ``domain`` or image_description),
    ``prior`` | ``bing_tag``. Bad records, missing or unreadable images and repeated images (same
    bytes: the first is kept, as the official engine dedups by md5) are rejected, not fatal. With
    ``limit``, reading stops at that many usable captions."""
    from interleaf.processing.image import load_image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    captions: list[Caption] = []
    rejected: list[Rejected] = []
    records = ((f"{path.name}:{line}", rec, error) for line, rec, error in iter_records(path))
    for r in usable_records(records, root, domain, load_image, rejected, need_caption=True):
        captions.append(
            Caption(
                id=r.id,
                image=r.image,
                path=r.path,
                caption=r.caption.strip().replace("\n\n", "\n"),
                domain=r.domain,
                prior=prior_text(first_field(r.record, ("prior", "bing_tag"))),
                digest=r.digest,
            )
        )
        if limit is not None and len(captions) >= limit:
            break
    return captions, rejected


def prior_text(prior: Any) -> str:
    """Prior knowledge as prompt text: a string as is, other JSON values as JSON, "Empty" for none."""
    text = (
        prior
        if isinstance(prior, str)
        else json.dumps(prior, ensure_ascii=False)
        if prior is not None
        else ""
    )
    return text.strip() or "Empty"


# ----------------------------------------------------------------------------------------------------
# prompts

_TASK_EN = {
    "judge": (
        "{n} yes/no questions. Answer exactly half of them Yes and half No according to the description;"
        ' for a "No" question, use a plausible but wrong detail related to the image.'
    ),
    "choice": (
        "{n} multiple-choice questions, each with four options labelled A, B, C and D, exactly one of"
        " which is right according to the description."
    ),
    "long": "{n} open questions, each with a detailed answer of several sentences based on the description.",
    "short": "{n} open questions, each with a short answer of a few words based on the description.",
}
_FORMAT_EN = {
    "judge": "<Q{i}> question {i} </Q{i}> <C{i}> Yes, No </C{i}> <A{i}> Yes or No </A{i}>",
    "choice": "<Q{i}> question {i} </Q{i}> <C{i}> A. ... B. ... C. ... D. ... </C{i}> <A{i}> the right letter </A{i}>",
    "long": "<Q{i}> question {i} </Q{i}> <A{i}> the detailed answer </A{i}>",
    "short": "<Q{i}> question {i} </Q{i}> <A{i}> the short answer </A{i}>",
}
_TASK_ZH = {
    "judge": "{n}道判断题。根据描述，其中一半的答案为“是”，另一半为“否”；答案为“否”的题目可以使用与图像相关但错误的细节。",
    "choice": "{n}道单项选择题，每题有A、B、C、D四个选项，根据描述只有一个选项正确。",
    "long": "{n}道开放式问答题，每题根据描述给出包含多个句子的详细答案。",
    "short": "{n}道开放式问答题，每题根据描述给出几个词的简短答案。",
}
_FORMAT_ZH = {
    "judge": "<Q{i}> 问题{i} </Q{i}> <C{i}> 是, 否 </C{i}> <A{i}> 是或否 </A{i}>",
    "choice": "<Q{i}> 问题{i} </Q{i}> <C{i}> A. ... B. ... C. ... D. ... </C{i}> <A{i}> 正确选项的字母 </A{i}>",
    "long": "<Q{i}> 问题{i} </Q{i}> <A{i}> 详细答案 </A{i}>",
    "short": "<Q{i}> 问题{i} </Q{i}> <A{i}> 简短答案 </A{i}>",
}


def build_prompt(cap: Caption, type_: str, seeds: list[str], lang: str) -> str:
    """The generation prompt for one caption and instruction type (interleaf's wording of the
    official recipe: domain, prior knowledge, description, seed questions, tag format)."""
    n = ITEMS_PER_REQUEST[type_]
    domain = cap.domain.replace("_", " ")
    seed_list = json.dumps(seeds, ensure_ascii=False)
    if lang == "zh":
        fmt = "\n".join(_FORMAT_ZH[type_].format(i=i) for i in range(1, n + 1))
        return (
            f"下面是一张图像的描述和一组示例问题。请围绕“{domain}”设计{_TASK_ZH[type_].format(n=n)}\n"
            "生成的问题必须与示例问题的含义相近，并且只能根据描述回答。示例问题中<>里的内容是占位符，"
            "请根据描述换成一个具体的内容。\n"
            f"图像相关信息（Empty表示没有）：{cap.prior}\n"
            f"描述：{cap.caption}\n"
            f"示例问题：{seed_list}\n"
            f"请严格按照以下格式输出，不要输出其他内容：\n{fmt}\n"
        )
    fmt = "\n".join(_FORMAT_EN[type_].format(i=i) for i in range(1, n + 1))
    return (
        f"Below are the description of an image and some example questions about {domain}. Write"
        f" {_TASK_EN[type_].format(n=n)}\n"
        "Each new question must mean much the same as one of the example questions and must be"
        " answerable from the description alone. Text in <angle brackets> in an example is a placeholder:"
        " replace it with one concrete value taken from the description.\n"
        f"Prior knowledge about the image (Empty means none): {cap.prior}\n"
        f"Description: {cap.caption}\n"
        f"Example questions: {seed_list}\n"
        f"Write the questions and answers in exactly this format and nothing else:\n{fmt}\n"
    )


def _rng(seed: int, *parts: object) -> random.Random:
    # string seeds hash with SHA-512 in random.Random: stable across runs and Python versions
    return random.Random(":".join(str(p) for p in (seed, *parts)))


# ----------------------------------------------------------------------------------------------------
# asking


@dataclass
class Task:
    """One request to the LLM."""

    id: str
    messages: list[dict]
    key: str = ""
    response: str | None = None
    error: str | None = None
    meta: dict = field(default_factory=dict)


def ask_all(
    client: OpenAIClient,
    tasks: list[Task],
    store: ResponseStore,
    params: dict[str, Any],
    concurrency: int = 8,
    progress: bool = True,
    desc: str = "requests",
) -> Counter:
    """Answer every task: from the store when it holds the task's key, else from the endpoint, each
    answer committed as it arrives. Failed requests keep their ``error`` and are not stored (a rerun
    asks again). Returns counts: from_store, asked, failed."""
    from tqdm import tqdm

    counts: Counter = Counter()
    stored = store.get_many([t.key for t in tasks])
    # an empty reply a store of an older version kept is no answer: asked again, and replaced
    blank = [k for k, v in stored.items() if not v.strip()]
    if blank:
        store.drop(blank)
        stored = {k: v for k, v in stored.items() if v.strip()}
    todo = []
    for t in tasks:
        if t.key in stored:
            t.response = stored[t.key]
            counts["from_store"] += 1
        else:
            todo.append(t)
    if not todo:
        return counts

    def answer(t: Task) -> str:
        response = client.complete(t.messages, **params)
        if not response.strip():  # a filtered or cut-off reply: not stored, so a rerun asks again
            raise EndpointError("empty reply")
        store.put(t.key, t.id, response)  # committed by the worker: kept even if the loop below stops
        return response

    bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="req")
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(answer, t): t for t in todo}
        for fut in as_completed(futures):
            t = futures[fut]
            counts["asked"] += 1
            exc = fut.exception()
            if isinstance(exc, sqlite3.Error):
                raise exc  # the store takes no answers (disk full, ...): stop, do not count it as a request
            if exc is None:
                t.response = fut.result()
            else:
                t.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                counts["failed"] += 1
            bar.update(1)
    finally:
        # on Ctrl-C (or any error here) the requests not yet started are dropped, not all sent
        # while the run waits to stop; the ones in flight finish and are stored
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return counts


def endpoint_client(spec: str, timeout: float, retries: int) -> tuple[OpenAIClient, str]:
    """``openai:URL#MODEL`` -> (client, fingerprint for store keys)."""
    url, model = parse_openai_spec(spec)
    return OpenAIClient(url, model, timeout=timeout, retries=retries), f"openai:{url}#{model}"


def request_params(max_tokens: int, temperature: float | None) -> dict[str, Any]:
    """Sampling parameters sent with every request (only those set: the endpoint's defaults, which
    the official engine used, otherwise)."""
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    return params


def check_failures(spec: str, counts: Counter, tasks: list[Task], out: Path) -> None:
    """Every request asked failed (the endpoint is down or refuses us): one line naming the first
    reason; the outputs are already written."""
    if counts["asked"] and counts["failed"] == counts["asked"] and not counts["from_store"]:
        first = next(t.error for t in tasks if t.error)
        raise InputError(
            f"{spec}: all {counts['failed']} requests failed ({first}); {out} holds the errors, rerun to retry them"
        )


# ----------------------------------------------------------------------------------------------------
# writing


def human_turn(ins: Instruction, suffix: str) -> str:
    """The user turn of a sample: the image, the question, the options (multiple choice, one per
    line as MMIU and MMBench lay them out) and the answer-format suffix."""
    if ins.type == "choice":
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(ins.options))
        return f"<image>\n{ins.question}\n{options}" + (f"\n{suffix.strip()}" if suffix.strip() else "")
    if suffix and not suffix[0].isspace() and ins.question[-1:].isascii():
        suffix = " " + suffix  # a suffix file's "Answer briefly." after an English question
    return f"<image>\n{ins.question}{suffix}"


def group_turns(samples: list[dict]) -> list[dict]:
    """The instructions of one caption and type as one multi-turn conversation (as MMInstruct's
    multi-round QA), the image placeholder in its first turn only."""
    grouped: dict[tuple[str, str], dict] = {}
    for s in samples:
        key = (s["caption_id"], s["type"])
        if key not in grouped:
            grouped[key] = {
                **s,
                "id": f"{s['caption_id']}/{s['type']}",
                "conversations": list(s["conversations"]),
            }
            continue
        human, gpt = s["conversations"]
        later = {**human, "value": human["value"].removeprefix("<image>\n")}
        grouped[key]["conversations"] += [later, gpt]
    return list(grouped.values())


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class GenerateConfig:
    types: Sequence[str] = TYPES
    lang: str = "en"
    seed: int = 0
    max_tokens: int = 1024
    temperature: float | None = None
    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 3
    limit: int | None = None
    group_turns: bool = False  # one multi-turn sample per caption and type instead of one per item
    checks: Checks = field(default_factory=Checks)


def generate(
    captions_path: str | os.PathLike,
    llm: str,
    out: str | os.PathLike,
    config: GenerateConfig | None = None,
    bank: SeedBank | None = None,
    image_root: str | os.PathLike | None = None,
    domain: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline (see the module docstring); returns the stats written to ``stats.json``."""
    cfg = config or GenerateConfig()
    bank = bank or SeedBank()
    types = list(dict.fromkeys(cfg.types))  # "--types judge judge" asks once, not twice under one id
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise InputError(f"unknown instruction type {unknown[0]!r} (types: {', '.join(TYPES)})")
    if cfg.lang not in ("en", "zh"):
        raise InputError(f"unknown language {cfg.lang!r} (en or zh)")
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client, fingerprint = endpoint_client(llm, cfg.timeout, cfg.retries)
    params = request_params(cfg.max_tokens, cfg.temperature)

    captions, rejected = read_captions(captions_path, image_root, domain, cfg.limit)
    tasks: list[Task] = []
    for cap in captions:
        for type_ in types:
            templates = bank.templates(cap.domain, type_, cfg.lang)
            if not templates:
                detail = f"domain {cap.domain!r} has no {type_} seeds in {cfg.lang}"
                rejected.append(Rejected("task", "no_seeds", detail, cap.id, type_))
                continue
            rng = _rng(cfg.seed, cap.id, type_)
            seeds = rng.sample(templates, min(SEEDS_PER_PROMPT, len(templates)))
            prompt = build_prompt(cap, type_, seeds, cfg.lang)
            messages = [
                {"role": "system", "content": SYSTEM_MESSAGE},
                {"role": "user", "content": prompt},
            ]
            task = Task(f"{cap.id}/{type_}", messages, meta={"caption": cap, "type": type_, "rng": rng})
            task.key = request_key(task.id, SYSTEM_MESSAGE + "\n" + prompt, [], fingerprint, params)
            tasks.append(task)

    with ResponseStore(out / "responses.sqlite") as store:
        counts = ask_all(client, tasks, store, params, cfg.concurrency, progress, desc="instructions")

    samples: list[dict] = []
    kept_shingles: dict[tuple[str, str], list[set]] = {}
    item_counts: Counter = Counter()
    for task in tasks:
        cap, type_ = task.meta["caption"], task.meta["type"]
        if task.response is None:
            rejected.append(Rejected("request", "endpoint_error", task.error or "", cap.id, type_))
            continue
        kept, bad = check_response(type_, task.response, cfg.lang, cfg.checks)
        item_counts["parsed"] += len(kept) + sum(r.reason != "unparsable" for r in bad)
        for r in bad:
            stage = "request" if r.reason == "unparsable" else "item"
            rejected.append(Rejected(stage, r.reason, r.detail, cap.id, type_, r.item or None, task.response))
        suffixes = bank.suffix_list(type_, cfg.lang) or [""]
        for ins in kept:
            shingles = question_shingles(ins.question)
            group = kept_shingles.setdefault((cap.digest, type_), [])
            if any(is_near_duplicate(shingles, s, cfg.checks.near_duplicate) for s in group):
                detail = f"question {ins.question!r} repeats an earlier {type_} question of the image"
                rejected.append(Rejected("item", "duplicate_question", detail, cap.id, type_, ins.item))
                continue
            group.append(shingles)
            suffix = task.meta["rng"].choice(suffixes)
            samples.append(
                {
                    "id": f"{cap.id}/{type_}/{ins.item}",
                    "image": cap.image,
                    "conversations": [
                        {"from": "human", "value": human_turn(ins, suffix)},
                        {"from": "gpt", "value": ins.answer},
                    ],
                    "type": type_,
                    "domain": cap.domain,
                    "caption_id": cap.id,
                }
            )

    if cfg.group_turns:
        samples = group_turns(samples)
    root = Path(image_root) if image_root is not None else Path(captions_path).parent
    meta = {
        "instruct": {
            "root": os.path.relpath(root.resolve(), out.resolve()),
            "annotation": "instructions.jsonl",
        }
    }
    stats = _stats(captions, rejected, tasks, counts, item_counts, samples, cfg, fingerprint)
    stats["seconds"] = round(time.time() - started, 3)
    replace_text(out / "instructions.jsonl", jsonl_text(samples))
    replace_text(out / "rejected.jsonl", jsonl_text(r.to_json() for r in rejected))
    replace_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    replace_text(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    check_failures(llm, counts, tasks, out)
    return stats


def _stats(
    captions: list[Caption],
    rejected: list[Rejected],
    tasks: list[Task],
    counts: Counter,
    item_counts: Counter,
    samples: list[dict],
    cfg: GenerateConfig,
    fingerprint: str,
) -> dict[str, Any]:
    by_stage: dict[str, Counter] = {
        "caption": Counter(),
        "task": Counter(),
        "request": Counter(),
        "item": Counter(),
    }
    for r in rejected:
        by_stage[r.stage][r.reason] += 1
    answers: dict[str, Counter] = {"judge": Counter(), "choice": Counter()}
    for s in samples:
        if s["type"] in answers:
            for turn in s["conversations"][1::2]:
                answers[s["type"]][turn["value"]] += 1
    return {
        "llm": fingerprint,
        "types": list(dict.fromkeys(cfg.types)),
        "lang": cfg.lang,
        "captions": {"used": len(captions), "rejected": dict(by_stage["caption"])},
        "requests": {
            "total": len(tasks),
            "from_store": counts["from_store"],
            "asked": counts["asked"],
            "failed": counts["failed"],
            "rejected": dict(by_stage["request"]),
            "not_asked": dict(by_stage["task"]),  # a caption and type with no seed questions
        },
        "items": {"parsed": item_counts["parsed"], "rejected": dict(by_stage["item"])},
        "instructions": {
            "total": sum(len(s["conversations"]) // 2 for s in samples),
            "samples": len(samples),
            "by_type": dict(Counter(s["type"] for s in samples for _ in s["conversations"][1::2])),
            "by_domain": dict(Counter(s["domain"] for s in samples)),
        },
        # the answer balance a user checks first: yes/no and the position of the right option
        "answers": {k: dict(sorted(v.items())) for k, v in answers.items()},
    }
