"""TVR-Ranking (ranked video moment retrieval): loader and NDCG@K at IoU > mu, as the official code.

Follows Ranking-VMR/TVR-Ranking ``modules/ndcg_iou.py`` at commit db1dc44: for every query in the
predictions, ground-truth moments are sorted by relevance (descending, stable); for each threshold
mu, predictions are walked in rank order and each is matched greedily to the still-unmatched
ground-truth moment of the same video with the highest temporal IoU (first one on ties); a match
with IoU > mu takes that moment's relevance and removes it. DCG@K = sum (2^rel - 1) / log2(rank + 1)
over the first K predictions; the ideal DCG uses the query's K highest ground-truth relevances.
NDCG = DCG / IDCG (0 when IDCG is 0), averaged over queries.

The official comparison is strict (``>``); ``inclusive=True`` gives the paper's ``>=``. Queries
absent from the predictions are skipped by the official loop (the default here, with a warning);
``missing="zero"`` counts them as 0 instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from interleaf.errors import InputError, cannot_read, is_number

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 40)
DEFAULT_MUS = (0.3, 0.5, 0.7)


def temporal_iou(pred: tuple[float, float], gt: tuple[float, float]) -> float:
    """IoU of two [start, end] intervals (0 when the union is empty)."""
    inter = max(0, min(pred[1], gt[1]) - max(pred[0], gt[0]))
    union = (pred[1] - pred[0]) + (gt[1] - gt[0]) - inter
    return inter / union if union > 0 else 0


def dcg(relevances: list[float]) -> float:
    return sum((2**rel - 1) / math.log2(rank + 2) for rank, rel in enumerate(relevances))


def ndcg(pred_relevances: list[float], true_relevances: list[float]) -> float:
    ideal = dcg(sorted(true_relevances, reverse=True))
    return dcg(pred_relevances) / ideal if ideal > 0 else 0


def match_relevances(preds: list[dict], gts: list[dict], mu: float, inclusive: bool = False) -> list[float]:
    """Relevance earned by each prediction (rank order) under greedy one-to-one IoU matching.

    ``gts`` must already be sorted by relevance, descending (ties keep their file order).
    """
    remaining = list(gts)
    out = []
    for pred in preds:
        same_video = [g for g in remaining if g["video_name"] == pred["video_name"]]
        if not same_video:
            out.append(0)
            continue
        ious = [temporal_iou(pred["timestamp"], g["timestamp"]) for g in same_video]
        best = max(range(len(ious)), key=lambda i: (ious[i], -i))  # first maximum, as np.argmax
        hit = ious[best] >= mu if inclusive else ious[best] > mu
        if hit:
            out.append(same_video[best]["relevance"])
            remaining.remove(same_video[best])  # removes the first equal entry, as list.index + pop
        else:
            out.append(0)
    return out


def ndcg_iou(
    gt: dict[Any, list[dict]],
    pred: dict[Any, list[dict]],
    ks: tuple[int, ...] = DEFAULT_KS,
    mus: tuple[float, ...] = DEFAULT_MUS,
    inclusive: bool = False,
    missing: str = "skip",
) -> dict[str, dict[str, float]]:
    """Mean NDCG@K at IoU threshold mu over queries: ``{"NDCG@K": {"mu": value}}``.

    ``gt``: query id -> relevant moments (``video_name``, ``timestamp`` [s, e], ``relevance``).
    ``pred``: query id -> ranked predictions (``video_name``, ``timestamp``). Ids are compared as
    strings (JSON object keys are strings, the official in-memory keys are ints).
    """
    if missing not in ("skip", "zero"):
        raise InputError(f"missing must be 'skip' or 'zero', not {missing!r}")
    gt_s = {str(k): v for k, v in gt.items()}
    pred_s = {str(k): v for k, v in pred.items()}
    unknown = [k for k in pred_s if k not in gt_s]
    if unknown:
        raise InputError(
            f"{len(unknown)} predicted queries are not in the ground truth (first: {unknown[0]})"
        )
    absent = [k for k in gt_s if k not in pred_s]
    if absent:
        action = "skipped, as the official code" if missing == "skip" else "counted as 0"
        log.warning("%d of %d ground-truth queries have no predictions (%s)", len(absent), len(gt_s), action)
    per: dict[int, dict[float, list[float]]] = {k: {mu: [] for mu in mus} for k in ks}
    queries = list(pred_s) + (absent if missing == "zero" else [])
    for qid in queries:
        gts = sorted(gt_s[qid], key=lambda g: g["relevance"], reverse=True)
        preds = pred_s.get(qid, [])
        true_rel = [g["relevance"] for g in gts]
        for mu in mus:
            got = match_relevances(preds, gts, mu, inclusive)
            for k in ks:
                per[k][mu].append(ndcg(got[:k], true_rel[:k]))
    return {
        f"NDCG@{k}": {str(mu): (sum(v) / len(v) if v else 0.0) for mu, v in d.items()} for k, d in per.items()
    }


def _load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from exc


def _check_moment(path: str | os.PathLike, where: str, m: Any, keys: tuple[str, ...]) -> None:
    """``m`` is an object with ``keys``: a string video_name, a timestamp [s, e], a number relevance."""
    if not isinstance(m, dict):
        raise InputError(f"{path}: {where} is not an object")
    for key in keys:
        if key not in m:
            raise InputError(f"{path}: {where} has no field {key!r}")
    ts = m["timestamp"]
    if not isinstance(m["video_name"], str):
        raise InputError(f"{path}: {where} field 'video_name' must be a string, got {m['video_name']!r}")
    if not (isinstance(ts, list) and len(ts) == 2 and all(is_number(t) for t in ts)):
        raise InputError(f"{path}: {where} field 'timestamp' must be [start, end] in seconds, got {ts!r}")
    if "relevance" in keys and not is_number(m["relevance"]):
        raise InputError(f"{path}: {where} field 'relevance' must be a number, got {m['relevance']!r}")


def load_split(path: str | os.PathLike) -> dict[str, list[dict]]:
    """An official split file (list of ``{query_id, query, relevant_moment: [...]}``) -> id -> moments."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of queries")
    out: dict[str, list[dict]] = {}
    for i, q in enumerate(data):
        if not isinstance(q, dict) or "query_id" not in q or "relevant_moment" not in q:
            raise InputError(f"{path}: query {i} lacks 'query_id' or 'relevant_moment'")
        if not isinstance(q["relevant_moment"], list):
            raise InputError(f"{path}: query {q['query_id']} field 'relevant_moment' must be a list")
        for j, m in enumerate(q["relevant_moment"]):
            _check_moment(
                path, f"query {q['query_id']} moment {j}", m, ("video_name", "timestamp", "relevance")
            )
        out[str(q["query_id"])] = q["relevant_moment"]
    return out


def load_predictions(path: str | os.PathLike) -> dict[str, list[dict]]:
    """``{query_id: [{"video_name", "timestamp": [s, e], "model_scores"}, ...]}`` in rank order."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object mapping query_id to ranked predictions")
    for qid, preds in data.items():
        if not isinstance(preds, list):
            raise InputError(f"{path}: predictions of query {qid} are not a list")
        for j, p in enumerate(preds):
            _check_moment(path, f"query {qid} prediction {j}", p, ("video_name", "timestamp"))
    return data


def load_video_corpus(path: str | os.PathLike) -> dict[str, float]:
    """``video_corpus.json``: ``{video_name: duration in seconds}`` (the official layout), checked."""
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a non-empty object mapping video_name to duration")
    for name, duration in data.items():
        if not (is_number(duration) and duration >= 0):
            raise InputError(
                f"{path}: duration of video {name!r} must be a non-negative number, got {duration!r}"
            )
    return data


def check_videos(gt: dict[Any, list[dict]], pred: dict[Any, list[dict]], corpus: dict[str, float]) -> int:
    """Check both sides against the corpus. A ground-truth video outside it means the split and the
    corpus do not belong together (an error); predicted videos outside it can only score 0 (the
    official code does not check): they are warned about and their number returned."""
    for qid, moments in gt.items():
        for m in moments:
            if m["video_name"] not in corpus:
                raise InputError(
                    f"ground-truth video {m['video_name']!r} (query {qid}) is not in the video corpus"
                )
    unknown = [p["video_name"] for preds in pred.values() for p in preds if p["video_name"] not in corpus]
    if unknown:
        log.warning("%d predicted moments name videos outside the corpus (first: %s); they score 0",
                    len(unknown), unknown[0])  # fmt: skip
    return len(unknown)
