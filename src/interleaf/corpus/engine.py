"""Local corpus engine: sharded, multi-process, isolated per document, resumable.

A build runs three phases over an output directory ``OUT``::

    1. documents (parallel)   read -> extract -> text filters -> MinHash signature
                               one committed directory per input shard: OUT/_work/stage1/s-NNNNN
    2. dedup (global)         URL dedup, MinHash LSH clusters, image-URL frequencies
                               OUT/_work/dedup (decisions for every document, deterministic)
    3. finalize (per shard)   apply the dedup decisions, [fetch images + pixel filters], write
                               OUT/data/part-NNNNN.parquet, OUT/excluded/part-NNNNN.jsonl,
                               OUT/errors/part-NNNNN.jsonl; then OUT/stats.json and OUT/_SUCCESS

Isolation: the driver reads the input (cheap: < 5% of a web pipeline's time) and hands records
in small batches to worker processes; a worker that does not answer within ``extract.timeout_s``
for one record is killed, a worker that dies is noticed by its closed pipe; either way the record
it was working on is recorded as an error (``timeout`` / ``crash``), a fresh worker is started,
and the rest of its batch is sent again. No document is ever lost or counted twice.

Resumption: every unit of work is written under a temporary name and renamed into place, and a
unit is skipped on restart exactly when its committed output exists. Shards are fixed runs of
``read.shard_size`` consecutive input records, the dedup decisions depend only on the committed
shards, and the output of each shard only on its inputs and the decisions, so a run killed at any
point and started again ends with byte-identical data files.

Accounting (``stats.json``): records read = documents written + excluded + errors, always; every
stage keeps documents and images in/out by reason (``StepStats``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

from interleaf.corpus import pipeline as P
from interleaf.corpus.base import Drop, RawPage, ReadError, StepStats
from interleaf.corpus.document import Document
from interleaf.errors import ConfigError, InputError, cannot_read

# the version of what a build writes; a build started by a version that wrote otherwise is not
# resumed (its finished shards would be mixed with new ones). 2: the C4 default of FineWeb,
# general_metadata.filter_scores, read.max_page_bytes the extractor's one size limit
RUN_FORMAT = 2
WORK = "_work"

# --------------------------------------------------------------------------------------------
# inputs


# files in an input folder that are a site's assets, not pages or corpora: skipped without a count
# (a page's images are read through its <img> tags, never as inputs); any other file that is not
# a supported input is recorded as a read error ("unsupported_file"), never skipped silently
_ASSET_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".ico", ".bmp", ".tif", ".tiff", ".avif",
    ".css", ".js", ".mjs", ".map", ".woff", ".woff2", ".ttf", ".otf", ".eot",
)  # fmt: skip


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input paths in a fixed order (a resumed run must see the records in the same order).

    A folder yields everything in it: its HTML pages as one input (the folder itself, read by
    ``read_html``, so ``read.shard_by: files`` keeps a site in one shard), then its WARC and
    corpus files, then its unsupported files (each read as one ``unsupported_file`` error), each
    group in sorted order. Hidden entries (``.git``, ``.DS_Store``) and assets are not inputs.
    """
    from interleaf.corpus.warc import folder_files

    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: input does not exist")
        p = p.resolve()
        if not p.is_dir():
            if _kind(p) == "unsupported":  # named explicitly: a mistake worth stopping for
                raise InputError(f"{p}: unknown input type (expected WARC, HTML file/dir, Parquet or JSONL)")
            out.append(p)
            continue
        groups: dict[str, list[Path]] = {"html": [], "warc": [], "corpus": [], "unsupported": []}
        for f in folder_files(p):
            if not f.name.lower().endswith(_ASSET_SUFFIXES):
                kind = _kind(f)
                if kind == "corpus" and not _corpus_file(f):  # a site's manifest.json, not a corpus
                    kind = "unsupported"
                groups[kind].append(f)
        if not any(groups.values()):
            raise InputError(f"{p}: folder holds no WARC, HTML, Parquet or JSONL files")
        if groups["html"]:
            out.append(p)
        out.extend(groups["warc"] + groups["corpus"] + groups["unsupported"])
    return out


CORPUS_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")


_JSON_SUFFIXES = (".json", ".json.gz")  # a corpus (JSON lines) or any JSON file: looked into


_ONE_DOCUMENT_BYTES = 64 << 20  # a .json this small may be one (pretty-printed) JSON document


def _corpus_file(path: Path) -> bool:
    """False for a ``.json`` file that is not a JSON-lines corpus: its first non-empty line is a
    JSON value but not a corpus row (``texts`` and ``images``, or MMC4's ``text_list``), or the
    whole file is one multi-line JSON document (a site's ``manifest.json``). A first line that does
    not parse in a file that is not one document is a damaged row of a corpus: read, and that line
    counted as an error. Other corpus suffixes are corpora."""
    if not path.name.lower().endswith(_JSON_SUFFIXES):
        return True
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            first = next((line for line in fh if line.strip()), None)
            if first is None:
                return False
            try:
                row = json.loads(first)
            except ValueError:
                if path.stat().st_size > _ONE_DOCUMENT_BYTES:
                    return True
                fh.seek(0)
                json.loads(fh.read())  # parses: one pretty-printed document, not JSON lines
                return False
            return isinstance(row, dict) and ({"texts", "images"} <= row.keys() or "text_list" in row)
    except (OSError, EOFError, UnicodeDecodeError):  # (UnicodeDecodeError is a ValueError too)
        return False
    except ValueError:  # not one document either: JSON lines with a damaged row
        return True


def _no_warc_data(path: Path) -> ReadError | None:
    """The error of a WARC input without a byte of WARC data: 0 bytes, gzip members holding none
    (``empty_file``), or one gzip member broken before its first byte (``corrupt_record``, as the
    reader records a file it cannot parse). ``read_warc`` yields nothing for these, and a build
    would report 0 records as if the file had been read. None for anything else (the reader's)."""
    try:
        if path.stat().st_size == 0:
            return ReadError(str(path), None, "empty_file", "0 bytes")
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return None
            fh.seek(0)
            try:
                with gzip.GzipFile(fileobj=fh) as gz:
                    if gz.read(1) == b"":
                        return ReadError(str(path), None, "empty_file", "gzip data of 0 bytes")
            except (OSError, EOFError, zlib.error) as exc:
                from interleaf.corpus.warc import next_record_start

                if next_record_start(str(path), 0, True) is not None:
                    return None  # the reader records this member and resyncs on the next one
                return ReadError(str(path), 0, "corrupt_record", f"{type(exc).__name__}: {exc}"[:300])
    except OSError:  # unreadable: the reader records it
        return None
    return None


def _kind(path: Path) -> str:
    from interleaf.corpus.warc import HTML_SUFFIXES, WARC_SUFFIXES

    name = path.name.lower()
    if path.is_dir():
        return "html"
    if name.endswith((*WARC_SUFFIXES, ".warc.zst")):
        return "warc"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    if name.endswith(CORPUS_SUFFIXES):
        return "corpus"
    return "unsupported"


def iter_records(
    paths: list[Path], max_page_bytes: int | None = None
) -> Iterator[RawPage | Document | ReadError]:
    """Every record of every input, in order: pages to extract, corpus rows, or read errors.

    ``max_page_bytes`` (``read.max_page_bytes``): no more than one byte over it is read or
    decompressed of a page (the worker refuses the page as ``page_too_large``); WARC records over
    it by more than the HTTP headers' allowance are ``record_too_large`` read errors, unread.
    """
    for path in paths:
        kind = _kind(path)
        if kind == "warc":
            from interleaf.corpus.warc import HTTP_HEADER_ALLOWANCE, MAX_RECORD_BYTES, read_warc

            error = _no_warc_data(path)
            if error is not None:  # counted and recorded, as a file read_warc cannot parse is
                yield error
                continue
            limit = MAX_RECORD_BYTES if max_page_bytes is None else max_page_bytes + HTTP_HEADER_ALLOWANCE
            yield from read_warc(str(path), max_record_bytes=limit)
        elif kind == "html":
            from interleaf.corpus.warc import read_html

            yield from read_html(str(path), max_bytes=max_page_bytes)
        elif kind == "corpus" and not _corpus_file(path):
            yield ReadError(
                str(path), None, "unsupported_file", "a JSON file that is not a JSON-lines corpus"
            )
        elif kind == "corpus":
            from interleaf.corpus.formats import read_corpus

            yield from read_corpus(str(path))
        else:
            yield ReadError(str(path), None, "unsupported_file", "not a WARC, HTML, Parquet or JSONL file")


def _record_ident(rec: Any) -> dict:
    if isinstance(rec, RawPage):
        return {
            "url": rec.url,
            "source": rec.warc_filename,
            "position": rec.warc_record_offset,
            "record_id": rec.record_id,
        }
    if isinstance(rec, Document):
        return {"id": rec.id, "url": rec.url}
    if isinstance(rec, ReadError):
        return {"source": rec.source, "position": rec.position}
    return {}


# --------------------------------------------------------------------------------------------
# per-record processing (runs inside worker processes)


class DocProcessor:
    """extract -> filters -> signature for one record; returns a picklable outcome dict.

    Outcome keys: ``status`` (kept | excluded | error), ``stage``, ``reason``, ``detail``,
    identification (``id``, ``url``, ``source``, ``position``), ``stats`` (the ``StepStats`` of
    the stages this record went through), and for kept documents ``row`` and ``sig``.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.extract = P.Extraction(cfg)
        self.filters = P.build_filters(cfg)
        self.max_bytes = int(cfg["read"]["max_page_bytes"])
        self.full_exclusions = cfg["write"]["exclusions"] == "full"
        self.hasher = None
        if cfg["dedup"]["minhash"]["enabled"]:
            from interleaf.corpus.dedup import MinHasher

            self.hasher = MinHasher(P.minhash_config(cfg))

    def __call__(self, rec: Any) -> dict:
        ident = _record_ident(rec)
        if isinstance(rec, ReadError):
            return {"status": "error", "stage": "read", "reason": rec.reason, "detail": rec.detail, **ident}
        touched: list[StepStats] = []
        if isinstance(rec, RawPage):
            if len(rec.html) > self.max_bytes:
                st = StepStats(name="extract", docs_in=1)
                st.errors_by_reason["page_too_large"] += 1
                # the readers stop one byte over the limit: the page's size is not known
                size = "more than" if len(rec.html) == self.max_bytes + 1 else f"{len(rec.html)} bytes >"
                return {
                    "status": "error",
                    "stage": "extract",
                    "reason": "page_too_large",
                    "detail": f"{size} read.max_page_bytes={self.max_bytes}",
                    "stats": [st],
                    **ident,
                }
            self.extract.stats = StepStats(name="extract")
            out = self.extract(rec)
            touched.append(self.extract.stats)
        elif isinstance(rec, Document):
            out = rec
        else:
            return {"status": "error", "stage": "read", "reason": "unknown_record", "detail": repr(rec)[:200]}
        stage = "extract"
        dropped_doc = None
        if not isinstance(out, Drop):
            for step in self.filters:
                step.stats = StepStats(name=step.name)
                res = step(out)
                touched.append(step.stats)
                stage = step.name
                if isinstance(res, Drop):
                    out, dropped_doc = res, out
                    break
                out = res
        if isinstance(out, Drop):
            result = {
                "status": "error" if out.error else "excluded",
                "stage": stage,
                "reason": out.reason,
                "detail": out.detail,
                "stats": touched,
                **ident,
            }
            if dropped_doc is not None:
                result.update(id=dropped_doc.id, url=dropped_doc.url)
                if self.full_exclusions:
                    result["row"] = dropped_doc.to_row()
            return result
        doc: Document = out
        result = {
            "status": "kept",
            "stats": touched,
            "row": doc.to_row(),
            **ident,
            "id": doc.id,
            "url": doc.url,
        }
        if self.hasher is not None:
            result["sig"] = self.hasher.signature(doc.text)
        return result


def _die_with_parent() -> None:
    # a worker must not outlive a driver that was SIGKILLed (it would keep a core busy)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn, cfg: dict) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = DocProcessor(cfg)
    conn.send((_READY, None))  # the per-document clock starts now, not at fork time
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for key, rec in batch:
            try:
                outcome = proc(rec)
            except Exception as exc:  # noqa: BLE001 - recorded, never fatal
                outcome = {
                    "status": "error",
                    "stage": "extract",
                    "reason": f"internal:{type(exc).__name__}",
                    "detail": str(exc)[:500],
                    **_record_ident(rec),
                }
            conn.send((key, outcome))


_READY = "__ready__"


@dataclass
class _Worker:
    proc: Any
    conn: Any
    inflight: deque
    last: float = 0.0
    ready: bool = False


class IsolatedPool:
    """Worker processes that process records one at a time under a per-record time limit.

    ``imap(items)`` takes ``(key, record)`` pairs and yields ``(key, outcome)`` pairs (in
    completion order). A record whose worker hangs past ``timeout_s`` or dies yields an error
    outcome (``timeout`` / ``crash``); the worker is replaced and the run goes on.
    """

    def __init__(self, cfg: dict, workers: int = 1, timeout_s: float | None = None, batch_size: int = 8):
        self.cfg = cfg
        self.n = max(1, int(workers))
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg["extract"]["timeout_s"])
        self.batch_size = batch_size
        self.ctx = mp.get_context("fork")
        self.workers: list[_Worker] = []
        self.restarts = 0
        self.startup_s = 120.0  # a worker building its extractor/filters is not a hanging page

    def _limit(self, w: _Worker) -> float:
        return self.timeout_s if w.ready else max(self.timeout_s, self.startup_s)

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child, self.cfg), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc=proc, conn=parent, inflight=deque())

    def _kill(self, w: _Worker) -> int | None:
        with contextlib.suppress(Exception):
            w.proc.kill()
        w.proc.join(5)
        with contextlib.suppress(Exception):
            w.conn.close()
        return w.proc.exitcode

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self.workers:
            w.proc.join(2)
            if w.proc.is_alive():
                self._kill(w)
        self.workers = []

    def _send(self, idx: int, batch: list) -> None:
        w = self.workers[idx]
        w.inflight.extend(batch)
        w.last = time.monotonic()
        try:
            w.conn.send(batch)
        except (BrokenPipeError, OSError):
            pass  # noticed as a crash by the wait loop (EOF)

    def _fail(self, idx: int, reason: str, detail: str) -> tuple[Any, dict]:
        """Kill worker ``idx`` (if needed), blame its current record, resend the rest."""
        w = self.workers[idx]
        code = self._kill(w)
        if not w.ready:  # not a page's fault: the worker could not even build its pipeline
            self.close()
            raise RuntimeError(f"corpus worker failed to start ({reason}, exit code {code})")
        key, rec = w.inflight.popleft()
        rest = list(w.inflight)
        self.restarts += 1
        self.workers[idx] = self._start()
        if rest:
            self._send(idx, rest)
        if reason == "crash":
            detail = f"worker exited with code {code}"
        outcome = {"status": "error", "stage": "extract", "reason": reason, "detail": detail}
        outcome.update(_record_ident(rec))
        st = StepStats(name="extract", docs_in=1)
        st.errors_by_reason[reason] += 1
        outcome["stats"] = [st]
        return key, outcome

    def imap(self, items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, dict]]:
        it = iter(items)
        exhausted = False
        if not self.workers:
            self.workers = [self._start() for _ in range(self.n)]
        try:
            while True:
                for i, w in enumerate(self.workers):
                    if not w.inflight and not exhausted:
                        batch = []
                        for _ in range(self.batch_size):
                            try:
                                batch.append(next(it))
                            except StopIteration:
                                exhausted = True
                                break
                        if batch:
                            self._send(i, batch)
                busy = [i for i, w in enumerate(self.workers) if w.inflight]
                if not busy:
                    if exhausted:
                        return
                    continue
                now = time.monotonic()
                deadline = min(self.workers[i].last + self._limit(self.workers[i]) for i in busy)
                ready = wait([self.workers[i].conn for i in busy], timeout=max(0.0, deadline - now))
                ready_set = set(map(id, ready))
                for i in busy:
                    w = self.workers[i]
                    if id(w.conn) not in ready_set:
                        continue
                    while w.inflight and w.conn.poll():
                        try:
                            key, outcome = w.conn.recv()
                        except (EOFError, OSError):
                            yield self._fail(i, "crash", "")
                            break
                        if key == _READY:
                            w.ready, w.last = True, time.monotonic()
                            continue
                        expect, _ = w.inflight.popleft()
                        assert key == expect, (key, expect)
                        w.last = time.monotonic()
                        yield key, outcome
                        w = self.workers[i]
                now = time.monotonic()
                for i in busy:
                    w = self.workers[i]
                    if w.inflight and now - w.last > self._limit(w):
                        yield self._fail(i, "timeout", f"no result within {self.timeout_s:g} s")
        finally:
            self.close()


# --------------------------------------------------------------------------------------------
# atomic files


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl(rows: Iterable[dict]) -> str:
    """Serialise ``rows`` as JSON Lines text (sorted keys, non-ASCII kept)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON Lines file into a list of dicts; a missing file reads as empty."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def clean_tmp(d: Path) -> None:
    """Remove the temporaries (names containing ``.tmp``) a killed run left in folder ``d``."""
    if not d.exists():
        return
    for p in d.iterdir():
        if ".tmp" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# stats helpers


class StatsBook:
    """Ordered per-stage ``StepStats`` (stage name -> stats), mergeable and JSON-able."""

    def __init__(self) -> None:
        self.stages: dict[str, StepStats] = {}

    def get(self, name: str) -> StepStats:
        if name not in self.stages:
            self.stages[name] = StepStats(name=name)
        return self.stages[name]

    def add(self, st: StepStats) -> None:
        self.get(st.name).merge(st)

    def merge(self, other: StatsBook) -> StatsBook:
        for st in other.stages.values():
            self.add(st)
        return self

    def to_list(self) -> list[dict]:
        return [st.to_dict() for st in self.stages.values()]

    @classmethod
    def from_list(cls, items: list[dict]) -> StatsBook:
        book = cls()
        for d in items:
            book.add(StepStats.from_dict(d))
        return book


# --------------------------------------------------------------------------------------------
# phase 1: shard commit


def shard_name(i: int) -> str:
    return f"s-{i:05d}"


def stage1_dir(out: Path) -> Path:
    return out / WORK / "stage1"


def commit_stage1_shard(out: Path, shard: int, outcomes: list[dict], num_perm: int) -> dict:
    """Write one shard's phase-1 results (ordered by input position) atomically."""
    book = StatsBook()
    read = book.get("read")
    kept, excluded, errors, keys, sigs = [], [], [], [], []
    for pos, o in enumerate(outcomes):
        read.docs_in += 1
        if o["status"] == "error" and o["stage"] == "read":
            read.errors_by_reason[o["reason"]] += 1
        else:
            read.docs_out += 1
        for st in o.get("stats") or []:
            book.add(st)
        ident = {
            k: o.get(k) for k in ("id", "url", "source", "position", "record_id") if o.get(k) is not None
        }
        ident["shard"], ident["index"] = shard, pos
        if o["status"] == "kept":
            row = o["row"]
            kept.append(row)
            gm = row.get("general_metadata") or {}
            keys.append(
                {
                    "id": gm.get("id"),
                    "url": gm.get("url"),
                    "crawl_date": gm.get("crawl_date"),
                    "images": [x for x in row["images"] if x is not None],
                    "pos": pos,
                }
            )
            sigs.append(o.get("sig"))
        else:
            rec = {**ident, "stage": o["stage"], "reason": o["reason"], "detail": o.get("detail", "")}
            if "row" in o:  # write.exclusions: full
                rec["document"] = o["row"]
            (errors if o["status"] == "error" else excluded).append(rec)
    if sigs and all(s is not None for s in sigs):
        sig_arr = np.stack(sigs).astype(np.uint32)
    else:
        sig_arr = np.zeros((len(kept), num_perm), dtype=np.uint32)
    final = stage1_dir(out) / shard_name(shard)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "docs.jsonl").write_text(jsonl(kept), encoding="utf-8")
    (tmp / "keys.jsonl").write_text(jsonl(keys), encoding="utf-8")
    np.save(tmp / "sig.npy", sig_arr)
    (tmp / "excluded.jsonl").write_text(jsonl(excluded), encoding="utf-8")
    (tmp / "errors.jsonl").write_text(jsonl(errors), encoding="utf-8")
    summary = {"shard": shard, "records": len(outcomes), "kept": len(kept), "stats": book.to_list()}
    (tmp / "stats.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    try:
        os.rename(tmp, final)  # the commit point
    except OSError:
        if not final.is_dir():
            raise
        # committed by an earlier attempt of this shard (a Ray task retried after its worker died
        # past the rename): the same records give the same files, the committed ones stay
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def committed_stage1(out: Path) -> set[int]:
    d = stage1_dir(out)
    if not d.exists():
        return set()
    return {int(p.name[2:]) for p in d.iterdir() if p.name.startswith("s-") and ".tmp" not in p.name}


# --------------------------------------------------------------------------------------------
# phase 2: dedup decisions


def load_keys(out: Path, n_shards: int) -> tuple[list[dict], np.ndarray, list[int]]:
    """Load the phase-1 keys and MinHash signatures of every shard, with each shard's record count."""
    keys: list[dict] = []
    sigs: list[np.ndarray] = []
    counts: list[int] = []
    for s in range(n_shards):
        d = stage1_dir(out) / shard_name(s)
        k = read_jsonl(d / "keys.jsonl")
        keys.extend(k)
        sigs.append(np.load(d / "sig.npy"))
        counts.append(len(k))
    sig = np.concatenate(sigs) if sigs else np.zeros((0, 1), dtype=np.uint32)
    return keys, sig, counts


def compute_dedup(cfg: dict, keys: list[dict], sigs: np.ndarray, band_edges_fn=None) -> dict:
    """Deterministic dedup decisions over the whole corpus (all shards concatenated in order).

    Order: exact URL dedup, then MinHash LSH among the URL survivors, then image-URL counts over
    the documents that survive both. ``band_edges_fn(valid) -> [edges per band]`` lets another
    executor (Ray) compute the per-band candidate pairs; by default they are computed here.
    Returns ``{"url": int64[n], "minhash": int64[n], "banned_images": sorted list}`` where the
    arrays hold each document's survivor index (itself when kept).
    """
    from interleaf.corpus import dedup as D

    n = len(keys)
    urls = [k.get("url") for k in keys]
    dates = [k.get("crawl_date") for k in keys]
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    url_surv = D.url_duplicates(urls, dates) if cfg["dedup"]["url"]["enabled"] else ids.copy()
    alive = url_surv == ids
    mh_surv = ids.copy()
    t1 = time.perf_counter()
    if cfg["dedup"]["minhash"]["enabled"] and n:
        mcfg = P.minhash_config(cfg)
        valid = alive & D.has_shingles(sigs)
        if band_edges_fn is None:
            bk = D.MinHasher(mcfg).band_keys(sigs)
            vs = sigs if mcfg.verify else None
            edges = [D.band_edges(bk[:, j], vs, mcfg.threshold, valid) for j in range(mcfg.num_bands)]
        else:
            edges = band_edges_fn(valid)
        mh_surv = D.minhash_duplicates(None, sigs, dates, mcfg, candidates=alive, edges=edges)
        alive &= mh_surv == ids
    banned: list[str] = []
    ic = cfg["dedup"]["image_urls"]
    t2 = time.perf_counter()
    if ic["enabled"]:
        kept_lists = (keys[i]["images"] for i in range(n) if alive[i])
        banned = sorted(D.frequent_image_urls(kept_lists, int(ic["max_occurrences"])))
    timings = {"dedup_url": t1 - t0, "dedup_minhash": t2 - t1, "dedup_image_urls": time.perf_counter() - t2}
    return {"url": url_surv, "minhash": mh_surv, "banned_images": banned, "timings": timings}


def dedup_dir(out: Path) -> Path:
    return out / WORK / "dedup"


def commit_dedup(out: Path, decisions: dict, counts: list[int]) -> None:
    final = dedup_dir(out)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.savez(tmp / "decisions.npz", url=decisions["url"], minhash=decisions["minhash"], counts=counts)
    (tmp / "banned_images.json").write_text(json.dumps(decisions["banned_images"]), encoding="utf-8")
    (tmp / "timings.json").write_text(json.dumps(decisions.get("timings", {})), encoding="utf-8")
    os.rename(tmp, final)


def load_dedup(out: Path) -> dict:
    d = dedup_dir(out)
    z = np.load(d / "decisions.npz")
    banned = json.loads((d / "banned_images.json").read_text(encoding="utf-8"))
    return {"url": z["url"], "minhash": z["minhash"], "counts": z["counts"].tolist(), "banned_images": banned}


# --------------------------------------------------------------------------------------------
# phase 3: finalize one shard


def finalize_shard(out: Path, cfg: dict, shard: int, decisions: dict) -> dict:
    """Apply the dedup decisions to one shard and write its final files."""
    src = stage1_dir(out) / shard_name(shard)
    rows = read_jsonl(src / "docs.jsonl")
    counts = decisions["counts"]
    offset = int(sum(counts[:shard]))
    banned = set(decisions["banned_images"])
    book = StatsBook()
    st_url, st_mh, st_img = book.get("dedup_url"), book.get("dedup_minhash"), book.get("dedup_image_urls")
    ic = cfg["dedup"]["image_urls"]
    full = cfg["write"]["exclusions"] == "full"
    id_of = None
    excluded = read_jsonl(src / "excluded.jsonl")
    positions = [k.get("pos", j) for j, k in enumerate(read_jsonl(src / "keys.jsonl"))]
    kept_docs: list[Document] = []
    for j, row in enumerate(rows):
        g = offset + j
        doc = Document.from_row(row)
        n_img = doc.n_images
        ident = {"id": doc.id, "url": doc.url, "shard": shard, "index": positions[j]}
        dropped = None
        for st, arr, reason in (
            (st_url, decisions["url"], "duplicate_url"),
            (st_mh, decisions["minhash"], "near_duplicate"),
        ):
            st.docs_in += 1
            st.images_in += n_img
            surv = int(arr[g])
            if surv != g:
                if id_of is None:
                    id_of = _survivor_ids(out, counts)
                st.excluded_by_reason[reason] += 1
                st.images_in_dropped_docs += n_img
                dropped = {**ident, "stage": st.name, "reason": reason, "detail": f"kept {id_of(surv)}"}
                if full:
                    dropped["document"] = row
                break
            st.docs_out += 1
            st.images_out += n_img
        if dropped:
            excluded.append(dropped)
            continue
        st_img.docs_in += 1
        st_img.images_in += n_img
        if banned:
            keep = [x is None or x not in banned for x in doc.images]
            removed = keep.count(False)
            if removed:
                doc = doc.select(keep)
                st_img.images_removed_by_reason["frequent_url"] += removed
        if ic["drop_documents_without_images"] and doc.n_images == 0 and n_img > 0:
            st_img.excluded_by_reason["no_images_left"] += 1
            st_img.images_in_dropped_docs += doc.n_images
            rec = {**ident, "stage": st_img.name, "reason": "no_images_left", "detail": ""}
            if full:
                rec["document"] = row
            excluded.append(rec)
            continue
        st_img.docs_out += 1
        st_img.images_out += doc.n_images
        kept_docs.append(doc)
    t_write = time.perf_counter()
    write = book.get("write")
    write.docs_in = write.docs_out = len(kept_docs)
    write.images_in = write.images_out = sum(d.n_images for d in kept_docs)
    fmt = cfg["write"]["format"]
    errors = read_jsonl(src / "errors.jsonl")
    data_dir, ex_dir, err_dir = out / "data", out / "excluded", out / "errors"
    for d in (data_dir, ex_dir, err_dir):
        d.mkdir(parents=True, exist_ok=True)
    ext = "parquet" if fmt == "parquet" else "jsonl"
    write_documents(data_dir / f"part-{shard:05d}.{ext}", kept_docs, fmt, cfg["write"]["layout"])
    atomic_write(ex_dir / f"part-{shard:05d}.jsonl", jsonl(excluded))
    atomic_write(err_dir / f"part-{shard:05d}.jsonl", jsonl(errors))
    write.time_s = time.perf_counter() - t_write
    s1 = json.loads((src / "stats.json").read_text(encoding="utf-8"))
    summary = {
        "shard": shard,
        "records": s1["records"],
        "docs_out": len(kept_docs),
        "excluded": len(excluded),
        "errors": len(errors),
        "stats": StatsBook.from_list(s1["stats"]).merge(book).to_list(),
    }
    atomic_write(out / WORK / "final" / f"{shard_name(shard)}.json", json.dumps(summary, indent=1))
    return summary


def _survivor_ids(out: Path, counts: list[int]):
    cache: dict[int, list] = {}
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def id_of(g: int) -> str:
        s = int(np.searchsorted(starts, g, side="right") - 1)
        if s not in cache:
            cache[s] = [k.get("id") for k in read_jsonl(stage1_dir(out) / shard_name(s) / "keys.jsonl")]
        return str(cache[s][g - int(starts[s])])

    return id_of


def write_documents(path: Path, docs: list[Document], fmt: str, layout: str = "obelics") -> None:
    """Write documents in the aligned-list layout (Parquet or JSONL) atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if fmt == "jsonl":
        tmp.write_text("".join(d.to_json() + "\n" for d in docs), encoding="utf-8")
    else:
        from interleaf.corpus.formats import write_parquet

        # an empty shard has no struct schema to infer: it is written in the obelics layout
        write_parquet(str(tmp), docs, layout=layout if docs else "obelics")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class RunPlan:
    out: Path
    inputs: list[Path]
    cfg: dict


def prepare_run(inputs: list[str | Path], out: str | Path, cfg: dict) -> RunPlan:
    """Check/record the run manifest; a resumed run must have the same inputs and config."""
    out = Path(out)
    paths = expand_inputs(inputs)
    if not paths:
        raise InputError("no input given")
    # a bad filter/extractor config fails here, as one ConfigError, before OUT is written: a run
    # recorded with it would refuse the corrected config as "another config"
    DocProcessor(cfg)
    manifest = {
        "format": RUN_FORMAT,
        "inputs": [str(p) for p in paths],
        "config": P.config_fingerprint(cfg),
    }
    work = out / WORK
    mpath = work / "run.json"
    if mpath.exists():
        old = json.loads(mpath.read_text(encoding="utf-8"))
        if old.get("format") != RUN_FORMAT:
            raise ConfigError(
                f"{out}: holds a run started by another interleaf version (run format "
                f"{old.get('format')}, this version writes {RUN_FORMAT}), which cannot be resumed; "
                "build again in a new output directory"
            )
        if old != manifest:
            raise ConfigError(
                f"{out}: holds a run with other inputs or another config; use a new output directory"
            )
    else:
        if out.exists() and any(p.name != WORK for p in out.iterdir()):
            raise ConfigError(f"{out}: output directory is not empty and holds no interleaf run")
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text(P.dump_config(cfg), encoding="utf-8")
        atomic_write(mpath, json.dumps(manifest, indent=1))
    for d in (stage1_dir(out), work, out / "data", out / "excluded", out / "errors", work / "final"):
        d.mkdir(parents=True, exist_ok=True)
        clean_tmp(d)
    return RunPlan(out=out, inputs=paths, cfg=cfg)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, leave=False, dynamic_ncols=True)


def run_stage1_local(plan: RunPlan, workers: int, progress: bool = True) -> int:
    """Phase 1 with an ``IsolatedPool``; returns the number of shards."""
    out, cfg = plan.out, plan.cfg
    marker = out / WORK / "stage1.json"
    if marker.exists():
        return int(json.loads(marker.read_text())["shards"])
    size = int(cfg["read"]["shard_size"])
    done = committed_stage1(out)
    num_perm = P.minhash_config(cfg).num_perm
    expected: dict[int, int] = {}
    buffers: dict[int, dict[int, dict]] = {}
    n_records = 0

    by_files = cfg["read"]["shard_by"] == "files"
    max_page = int(cfg["read"]["max_page_bytes"])

    def items() -> Iterator[tuple[tuple[int, int], Any]]:
        nonlocal n_records
        if by_files:  # shard = input file
            for s, path in enumerate(plan.inputs):
                if s in done:
                    continue
                buffers.setdefault(s, {})
                pos = 0
                for rec in iter_records([path], max_page):
                    yield (s, pos), rec
                    pos += 1
                expected[s] = pos
            return
        count: dict[int, int] = {}
        for idx, rec in enumerate(iter_records(plan.inputs, max_page)):
            n_records = idx + 1
            s, pos = divmod(idx, size)
            count[s] = pos + 1
            if s - 1 in count and s - 1 not in expected:
                expected[s - 1] = count[s - 1]
            if s in done:
                continue
            buffers.setdefault(s, {})
            yield (s, pos), rec
        for s, c in count.items():
            expected.setdefault(s, c)

    pool = IsolatedPool(cfg, workers=workers)
    bar = _progress(None, "extract+filter", progress)

    def try_commit() -> None:
        for s in sorted(buffers):
            if s in expected and len(buffers[s]) == expected[s]:
                b = buffers.pop(s)
                commit_stage1_shard(out, s, [b[i] for i in range(expected[s])], num_perm)

    for (s, pos), outcome in pool.imap(items()):
        buffers[s][pos] = outcome
        bar.update(1)
        try_commit()
    try_commit()
    bar.close()
    if by_files:
        n_shards = len(plan.inputs)
        n_records = -1  # counted per shard in the shards' stats
    else:
        n_shards = (n_records + size - 1) // size
    missing = set(range(n_shards)) - committed_stage1(out)
    if missing:  # pragma: no cover - would be a bug in the bookkeeping above
        raise RuntimeError(f"shards not committed: {sorted(missing)[:5]}")
    atomic_write(marker, json.dumps({"shards": n_shards, "records": n_records}))
    return n_shards


def run_dedup_local(plan: RunPlan, n_shards: int) -> None:
    if dedup_dir(plan.out).exists():
        return
    keys, sigs, counts = load_keys(plan.out, n_shards)
    decisions = compute_dedup(plan.cfg, keys, sigs)
    commit_dedup(plan.out, decisions, counts)


def final_done(out: Path, shard: int) -> bool:
    return (out / WORK / "final" / f"{shard_name(shard)}.json").exists()


def run_finalize_local(plan: RunPlan, n_shards: int, progress: bool = True) -> None:
    from tqdm import tqdm

    decisions = load_dedup(plan.out)
    for s in tqdm(range(n_shards), desc="dedup+write", unit="shard", disable=not progress, leave=False):
        if not final_done(plan.out, s):
            finalize_shard(plan.out, plan.cfg, s, decisions)


def write_summary(plan: RunPlan, n_shards: int) -> dict:
    """Merge per-shard stats into ``OUT/stats.json`` (checks the accounting) and mark success."""
    book = StatsBook()
    totals = {"records": 0, "docs_out": 0, "excluded": 0, "errors": 0}
    for s in range(n_shards):
        d = json.loads((plan.out / WORK / "final" / f"{shard_name(s)}.json").read_text())
        for k in totals:
            totals[k] += d[k]
        book.merge(StatsBook.from_list(d["stats"]))
    tpath = dedup_dir(plan.out) / "timings.json"
    if tpath.exists():  # the global dedup phase's own time, per stage
        for name, t in json.loads(tpath.read_text()).items():
            book.get(name).time_s += t
    order = list(P.STAGE_ORDER)
    stages = sorted(book.stages.values(), key=lambda st: _stage_rank(st.name, order))
    balanced = totals["records"] == totals["docs_out"] + totals["excluded"] + totals["errors"]
    stats = {
        "shards": n_shards,
        "records_in": totals["records"],
        "docs_out": totals["docs_out"],
        "excluded": totals["excluded"],
        "errors": totals["errors"],
        "balanced": balanced,
        "images_out": book.get("write").images_out,
        "stages": [st.to_dict() for st in stages],
        "format": plan.cfg["write"]["format"],
        "layout": plan.cfg["write"]["layout"],
    }
    if not balanced:  # pragma: no cover - an accounting bug must never pass silently
        raise RuntimeError(f"accounting broken: {totals}")
    atomic_write(plan.out / "stats.json", json.dumps(stats, indent=1))
    return stats


def _stage_rank(name: str, order: list[str]) -> tuple[int, str]:
    if name in order:
        return (order.index(name) * 10, "")
    if name.startswith("fetch"):
        return (order.index("fetch") * 10 + 1, name)
    return (order.index("filters") * 10, "")  # text filters keep their insertion order


def build(
    inputs: list[str | Path],
    out: str | Path,
    cfg: dict | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Run (or resume) a local build; returns the contents of ``OUT/stats.json``."""
    cfg = cfg or P.load_config()
    plan = prepare_run(inputs, out, cfg)
    if (plan.out / "_SUCCESS").exists():
        return json.loads((plan.out / "stats.json").read_text())
    n_shards = run_stage1_local(plan, workers, progress)
    run_dedup_local(plan, n_shards)
    run_finalize_local(plan, n_shards, progress)
    return finish(plan, n_shards, progress)


def finish(plan: RunPlan, n_shards: int, progress: bool = True) -> dict:
    """Merge the stats, run the optional image-fetch stage, mark the run successful."""
    stats = write_summary(plan, n_shards)
    if plan.cfg["fetch"]["enabled"]:
        from interleaf.corpus.fetch import fetch_corpus

        stats = fetch_corpus(plan.out, plan.cfg["fetch"], progress=progress)
    atomic_write(plan.out / "_SUCCESS", "")
    return stats


# --------------------------------------------------------------------------------------------
# conversion of a built corpus


def data_shards(out: Path, stats: dict) -> list[str]:
    """File names of the data shards of the finished build in ``out``: one per shard, empty ones
    too, as its ``stats.json`` (``stats``) counts them.

    One missing from ``out/data`` is an ``InputError`` naming it: every writer replaces a shard by
    rename, so it was lost afterwards, and read without it the corpus looks whole but is short.
    """
    ext = "parquet" if stats.get("format", "parquet") == "parquet" else "jsonl"
    names = [f"part-{s:05d}.{ext}" for s in range(int(stats["shards"]))]
    for name in names:
        if not (out / "data" / name).is_file():
            raise InputError(
                f"{out / 'data' / name}: missing ({out / 'stats.json'} counts {len(names)} data shards)"
            )
    return names


_STATS_KEYS = ("shards", "records_in", "docs_out", "images_out", "excluded", "errors", "stages")


def load_stats(out: str | Path) -> dict:
    """The ``stats.json`` of the finished build in ``out``. An ``InputError`` naming it when there
    is none, when it cannot be read, or when it is not a build's (a key missing, ``shards`` no count)."""
    p = Path(out) / "stats.json"
    if not p.exists():
        raise InputError(f"{out}: not a finished corpus build (no stats.json)")
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise cannot_read(p, exc) from None
    if (
        not isinstance(stats, dict)
        or not all(k in stats for k in _STATS_KEYS)
        or not isinstance(stats["shards"], int)
        or isinstance(stats["shards"], bool)
    ):
        raise InputError(f"{p}: not the stats of a corpus build (needs {', '.join(_STATS_KEYS)})")
    return stats


def iter_output_documents(out: str | Path) -> Iterator[Document]:
    """Every document of a finished build, shard by shard, in order."""
    from interleaf.corpus.fetch import read_docs

    out = Path(out)
    stats = load_stats(out)
    for name in data_shards(out, stats):
        yield from read_docs(out / "data" / name)


def convert_corpus(out: str | Path, to: str, dest: str | Path) -> tuple[int, int]:
    """Write the corpus in ``OUT`` as ``text`` / ``pairs`` / ``mmc4`` JSONL records to ``dest``.

    Returns ``(documents read, records written)``.
    """
    from interleaf.corpus import convert as C

    fns = {"text": C.to_text, "pairs": C.to_pairs, "mmc4": C.to_mmc4}
    if to not in fns:
        raise ConfigError(f"unknown conversion {to!r} (text, pairs, mmc4)")
    fn = fns[to]
    out, dest = Path(out), Path(dest)
    load_stats(out)  # a finished build, before anything is written
    if dest.is_dir():
        raise InputError(f"{dest}: is a directory (the destination is a JSONL file)")
    where = dest.resolve()
    if where.is_relative_to(out.resolve()) and where.relative_to(out.resolve()).parts[0] in _CORPUS_PARTS:
        raise InputError(f"{dest}: would overwrite part of the corpus {out}; write it elsewhere")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    n_in = n_out = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_output_documents(out):
                n_in += 1
                res = fn(doc)
                items = res if isinstance(res, list) or hasattr(res, "__next__") else [res]
                for item in items:
                    if item is None:
                        continue
                    if isinstance(item, str):
                        item = {"id": doc.id, "text": item}
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
                    n_out += 1
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return n_in, n_out


# what a build (and fetch-images) writes in OUT: a conversion must not land on any of it
_CORPUS_PARTS = ("stats.json", "_SUCCESS", "data", "excluded", "errors", "images", WORK)
