"""``interleaf eval run``: load a benchmark, ask the model what is not answered yet, score, report.

Flow: samples -> requests (official prompts) -> store lookup by key -> model for the rest, each
answer committed as it arrives -> predictions.jsonl, scores.json, report.md (+ MM-NIAH heatmaps and
official result files). Per-sample problems (missing images, records missing fields, endpoint
errors) are counted, listed in ``scores.json["errors"]`` and kept in the predictions with an
``error`` field: a sample is never dropped silently and never stops the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.errors import InputError
from interleaf.eval import mmiu, mmniah
from interleaf.eval.adapters import Adapter, Request, make_adapter, make_judge
from interleaf.files import jsonl_text, replace_text
from interleaf.store import ResponseStore, file_digest, request_key

log = logging.getLogger(__name__)
BENCHES = ("mmiu", "mmniah")
MMIU_MAX_NEW_TOKENS = 64  # the official InternVL driver allows 4096; answers are one letter


@dataclass
class Item:
    """A benchmark sample as the runner sees it."""

    id: str
    request: Request | None  # None when the sample cannot be asked (load error)
    sample: Any  # mmiu.MMIUSample | mmniah.NiahSample | None
    error: str | None = None  # why it cannot be asked (missing images, bad record)
    response: str | None = None
    key: str | None = None
    tags: dict = field(default_factory=dict)


def mmiu_tiles(n_images: int) -> int:
    """Tile budget of an MMIU prompt: VLMEvalKit's InternVL ``max(1, min(6, 64 // n))`` per image."""
    return max(1, n_images) * max(1, min(6, 64 // max(1, n_images)))


def mmiu_items(
    data: str, limit: int | None, max_new_tokens: int | None, image_root: str | None
) -> list[Item]:
    from interleaf.processing.prompt import image_prefix

    samples, errors = mmiu.load(data, image_root)
    ordered: list[tuple[int, Item]] = [
        (order, Item(id=sid, request=None, sample=None, error=reason)) for sid, reason, order in errors
    ]
    for s in samples:
        req = Request(
            prompt=image_prefix(len(s.images)) + s.text,
            images=s.images,
            max_new_tokens=max_new_tokens or MMIU_MAX_NEW_TOKENS,
            max_num=mmiu_tiles(len(s.images)),
            dynamic=True,
        )
        err = f"missing image {s.missing_images[0]}" if s.missing_images else None
        ordered.append(
            (s.order, Item(id=s.id, request=req, sample=s, error=err, tags={"task": s.record["task"]}))
        )
    items = [it for _, it in sorted(ordered, key=lambda x: x[0])]
    return items[:limit] if limit else items


def mmniah_items(
    data: str,
    limit: int | None,
    max_new_tokens: int | None,
    tasks: list[str] | None,
    image_root: str | None = None,
) -> tuple[list[Item], str]:
    ann_dir, split_images, split = mmniah.find_split_dir(data)
    image_root = Path(image_root) if image_root else split_images  # as the official mm_niah.json sets it
    items: list[Item] = []
    found = [t for t in mmniah.TASKS if (ann_dir / f"{t}.jsonl").is_file()]
    if tasks:
        unknown = [t for t in tasks if t not in mmniah.TASKS]
        if unknown:
            raise InputError(f"unknown MM-NIAH task {unknown[0]!r} (tasks: {', '.join(mmniah.TASKS)})")
        found = [t for t in found if t in tasks]
    if not found:
        raise InputError(f"{ann_dir}: no <task>.jsonl for any of {', '.join(mmniah.TASKS)}")
    for task in found:
        samples, errors = mmniah.load_task(ann_dir / f"{task}.jsonl", image_root, task)
        task_items = [
            Item(id=f"{task}/{sid}", request=None, sample=None, error=r, tags={"task": task})
            for sid, r in errors
        ]
        for s in samples:
            req = Request(
                prompt=s.prompt,
                images=s.images,
                max_new_tokens=max_new_tokens or s.max_new_tokens,
                max_num=1,
                dynamic=False,  # one 448x448 tile per image, as officially evaluated
            )
            missing = [p for p in s.images if not os.path.exists(p)]
            err = f"missing image {missing[0]}" if missing else None
            task_items.append(
                Item(id=f"{task}/{s.id}", request=req, sample=s, error=err, tags={"task": task})
            )
        items.extend(task_items[:limit] if limit else task_items)
    return items, split


def _keys(items: list[Item], adapter: Adapter) -> None:
    cache: dict[str, str] = {}
    settings = adapter.settings()
    for it in items:
        if it.request is None or it.error:
            continue
        req = it.request
        digests = [file_digest(p, cache) for p in req.images]
        gen = {
            **settings,
            "max_new_tokens": req.max_new_tokens,
            "max_num": req.max_num,
            "dynamic": req.dynamic,
        }
        it.key = request_key(it.id, req.prompt, digests, adapter.fingerprint, gen)


def answer(
    items: list[Item], adapter: Adapter, store: ResponseStore, batch_size: int, progress: bool = True
) -> dict:
    """Fill ``item.response`` from the store, asking the adapter for the rest. Returns run counters."""
    from tqdm import tqdm

    _keys(items, adapter)
    askable = [it for it in items if it.key]
    cached = store.get_many([it.key for it in askable])
    pending = []
    for it in askable:
        if it.key in cached:
            it.response = cached[it.key]
        else:
            pending.append(it)
    # Similar lengths batch together (less padding); the output order is restored by the caller.
    pending.sort(key=lambda it: (len(it.request.prompt), len(it.request.images)))
    bar = tqdm(total=len(pending), desc=f"eval {adapter.name}", unit="sample", disable=not progress or None)
    failed = 0
    for idx, result in adapter.generate([it.request for it in pending], batch_size=batch_size):
        it = pending[idx]
        if isinstance(result, Exception):
            it.error = f"model error: {type(result).__name__}: {result}".splitlines()[0]
            failed += 1
        else:
            it.response = str(result)
            store.put(it.key, it.id, it.response)
        bar.update(1)
    bar.close()
    return {"cached": len(cached), "generated": len(pending) - failed, "failed": failed}


def error_kind(error: str) -> str:
    if error.startswith("missing image"):
        return "missing_image"
    if error.startswith("model error"):
        return "model_error"
    return "bad_record"


def _error_summary(items: list[Item]) -> dict:
    errs = [it for it in items if it.error]
    return {
        "count": len(errs),
        "by_kind": dict(Counter(error_kind(e.error) for e in errs)),
        "samples": [{"id": e.id, "error": e.error} for e in errs[:1000]],
    }


def finish_mmiu(
    items: list[Item],
    out: Path,
    judge_spec: str | None,
    store: ResponseStore,
    timeout: float = 60.0,
    retries: int = 3,
) -> dict:
    judge = base = None
    if judge_spec:
        base = make_judge(judge_spec, timeout=timeout, retries=retries)  # the model's --timeout/--retries

        def judge(prompt: str) -> str:  # cached in the store like model answers
            key = request_key("judge", prompt, [], base.fingerprint, {"max_tokens": 512})
            hit = store.get(key)
            if hit is not None:
                return hit
            text = base(prompt)
            store.put(key, "judge", text)
            return text

    scored, rows = [], []
    for it in items:
        if it.sample is None:
            rows.append({"id": it.id, "error": it.error})
            continue
        rec = dict(it.sample.record)
        if it.error and it.error.startswith("missing image"):
            response = mmiu.MISSING_IMAGE_RESPONSE  # what the official driver records
        elif it.response is None:
            response = mmiu.MODEL_ERROR_RESPONSE
        else:
            response = it.response
        rec.update(id=it.id, response=response)
        if it.error:
            rec["error"] = it.error
        scored.append(rec)
        rows.append(rec)
    scores, extra = mmiu.score(scored, judge=judge) if scored else ({}, [])
    for rec, ex in zip(scored, extra):
        rec.update(ex)
    replace_text(out / "predictions.jsonl", jsonl_text(rows))
    if base is not None and base.failures:
        scores["judge_error"] = base.failures[0]  # the first reason, for the command's warning
    return scores


def finish_mmniah(items: list[Item], out: Path, model_name: str, split: str) -> dict:
    from interleaf.eval import report

    rows, by_task = [], {}
    for it in items:
        if it.sample is None:
            rows.append({"id": it.id, "task": it.tags.get("task"), "error": it.error})
            continue
        response = it.response if it.response is not None else ""  # errors score 0, and are counted
        rec = mmniah.result_record(it.sample, response)
        if it.error:
            rec["error"] = it.error  # never asked: scored as upstream, but no parse flag
        by_task.setdefault(it.sample.task, []).append(rec)
        row = {"id": it.id, "task": it.sample.task, **rec}
        if not it.error:
            answer = mmniah.task_answer(it.sample.task, it.sample.answer)
            row["parsed"] = mmniah.is_parsed(answer, response)  # None: open answer, nothing to parse
        rows.append(row)
    replace_text(out / "predictions.jsonl", jsonl_text(rows))
    res_dir = out / "mmniah_results"
    res_dir.mkdir(exist_ok=True)
    task_scores = []
    for task, recs in by_task.items():
        official = [{k: v for k, v in r.items() if k != "error"} for r in recs]  # the official layout
        replace_text(res_dir / f"{model_name}_{task}-{split}.jsonl", jsonl_text(official))
        task_scores.append(mmniah.score_records(recs, task=task, model=model_name, split=split))
    replace_text(
        res_dir / f"scores_{split}.json",
        json.dumps(mmniah.official_scores_json(task_scores), indent=1, ensure_ascii=False),
    )
    report.mmniah_heatmaps(task_scores, out / "heatmaps")
    return {"model": model_name, "split": split, **mmniah.split_summary(task_scores)}


def run(
    model: str | Adapter,
    bench: str,
    data: str,
    out: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    judge: str | None = None,
    image_root: str | None = None,
    tasks: list[str] | None = None,
    device: str = "cpu",
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    progress: bool = True,
) -> dict:
    """Run one benchmark end to end; returns the scores dict (also written to OUT/scores.json)."""
    from interleaf.eval import report

    if bench not in BENCHES:
        raise InputError(f"unknown benchmark {bench!r} (one of {', '.join(BENCHES)})")
    out = Path(out)
    split = None
    if bench == "mmiu":
        items = mmiu_items(data, limit, max_new_tokens, image_root)
    else:
        items, split = mmniah_items(data, limit, max_new_tokens, tasks, image_root)
    if not items:
        raise InputError(f"{data}: no samples")
    adapter = (
        model
        if isinstance(model, Adapter)
        else make_adapter(model, device, concurrency, timeout, retries, out)
    )
    out.mkdir(parents=True, exist_ok=True)  # only once the data and model are known good: no empty OUT
    with ResponseStore(out / "responses.sqlite") as store:
        counters = answer(items, adapter, store, batch_size, progress)
        if bench == "mmiu":
            scores = finish_mmiu(items, out, judge, store, timeout, retries)
        else:
            scores = finish_mmniah(items, out, adapter.name, split)
    scores = {
        "benchmark": bench,
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint,
        "num_samples": len(items),
        "run": counters,
        "errors": _error_summary(items),
        "adapter_notes": sorted(set(adapter.notes)),
        **scores,
    }
    replace_text(out / "scores.json", json.dumps(scores, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(report.markdown(scores, heatmaps=True), encoding="utf-8")
    return scores
