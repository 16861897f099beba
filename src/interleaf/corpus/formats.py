"""Corpus files: OBELICS / OmniCorpus Parquet and JSONL readers and writers, and MMC4 conversion.

Layouts (all hold the aligned ``texts`` / ``images`` / ``metadata`` lists of ``Document``):

- ``obelics`` (the default written by interleaf): ``texts`` and ``images`` are ``list<string>``;
  ``metadata`` and ``general_metadata`` are JSON strings, as in ``HuggingFaceM4/OBELICS``.
  Lossless for any metadata keys.
- ``omnicorpus``: ``metadata`` is ``list<struct>`` and ``general_metadata`` a ``struct``, as in
  ``OpenGVLab/OmniCorpus-CC``. Struct columns have one schema per file, so a key missing from
  one image's metadata reads back as ``None``.
- JSONL: one canonical row (``Document.to_row()``) per line, nested objects (not strings).

Readers accept all of these (and OBELICS-style JSON strings inside JSONL) and MMC4 rows (detected
by ``text_list``). They never raise on a bad row: they yield ``ReadError(path, position, reason)``
(position: 1-based line number in JSONL, 0-based row index in Parquet) and go on; a file that
cannot be opened at all gives one ``ReadError`` at position None. Rows without an ``id`` (OBELICS)
get a stable one: the SHA-1 of URL + WARC file + offset (or of the content when there is no URL).

MMC4 (``to_mmc4`` / ``from_mmc4``), exactly:

- ``text_list`` = the document's text nodes, in order (one entry per text node; not re-split).
- ``image_info[k]`` for the k-th image node: ``raw_url`` = the image URL; ``image_name`` =
  ``metadata['sha256']`` if fetched, else the SHA-256 hex of the URL (the name interleaf stores
  image bytes under); ``matched_text_index`` = index in ``text_list`` of the first text node after
  the image (MMC4/OpenFlamingo place an image before its matched sentence) or, for images after the
  last text node, the index of the last text node with ``"after_text": true``; ``matched_sim`` =
  ``metadata.get('matched_sim')``; ``metadata`` = the image metadata dict (interleaf extension).
- ``url`` = ``general_metadata['url']``; ``general_metadata`` = the whole dict (interleaf
  extension); ``similarity_matrix`` is passed through from ``general_metadata`` when present.

``from_mmc4`` rebuilds the node order from ``matched_text_index`` / ``after_text`` (images keep their
``image_info`` order among themselves), so ``from_mmc4(to_mmc4(doc)) == doc`` for every valid
document with at least one text node (an MMC4 row cannot place images without text). Real MMC4
rows (no interleaf extensions) become one text node per sentence with each image before its
matched sentence; its ``image_name`` / ``matched_sim`` / ``face_detections`` go to the image
metadata and ``could_have_url_duplicate`` to ``general_metadata``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from interleaf.corpus.base import ReadError
from interleaf.corpus.document import Document
from interleaf.errors import InputError

LAYOUTS = ("obelics", "omnicorpus")


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
def read_corpus(path: str | os.PathLike) -> Iterator[Document | ReadError]:
    """Documents of a Parquet or JSONL(.gz) corpus file (OBELICS, OmniCorpus, interleaf or MMC4 rows)."""
    p = str(path)
    low = p.lower()
    if low.endswith(".parquet"):
        yield from read_parquet(p)
    elif low.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        yield from read_jsonl(p)
    else:
        yield ReadError(p, None, "unknown_format", "expected .parquet or .jsonl[.gz]")


def row_to_document(row: Any) -> Document:
    """A Document from any supported row (canonical, OBELICS, OmniCorpus, MMC4); InputError if bad."""
    if isinstance(row, dict) and "text_list" in row and "texts" not in row:
        return from_mmc4(row)
    gm = row.get("general_metadata") if isinstance(row, dict) else None
    if isinstance(gm, dict) and isinstance(gm.get("filter_scores"), list):  # a Parquet map column
        try:
            row = dict(row, general_metadata=dict(gm, filter_scores=dict(gm["filter_scores"])))
        except (TypeError, ValueError):
            raise InputError("field 'general_metadata.filter_scores' must be a map") from None
    doc = Document.from_row(row)
    if not doc.general_metadata.get("id"):  # OBELICS rows carry no id: derive a stable one
        gm = doc.general_metadata
        key = f"{gm.get('url')}\n{gm.get('warc_filename')}\n{gm.get('warc_record_offset')}"
        if not gm.get("url"):
            key = _dumps([doc.texts, doc.images])
        gm["id"] = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return doc


def read_jsonl(path: str | os.PathLike) -> Iterator[Document | ReadError]:
    """One Document per JSON line; ``ReadError(path, line_number, reason)`` for each bad line."""
    p = str(path)
    try:
        fh = gzip.open(p, "rt", encoding="utf-8") if p.lower().endswith(".gz") else open(p, encoding="utf-8")
    except OSError as exc:
        yield ReadError(p, None, "unreadable_file", str(exc))
        return
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except (OSError, EOFError, UnicodeDecodeError) as exc:  # truncated gzip, bad bytes
                yield ReadError(p, lineno + 1, "unreadable_line", f"{type(exc).__name__}: {exc}"[:300])
                return
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield ReadError(p, lineno, "bad_json", str(exc)[:300])
                continue
            try:
                yield row_to_document(row)
            except InputError as exc:
                yield ReadError(p, lineno, "bad_row", str(exc)[:300])


def read_parquet(path: str | os.PathLike, batch_size: int = 1024) -> Iterator[Document | ReadError]:
    """One Document per Parquet row (0-based row numbers in errors)."""
    import pyarrow.parquet as pq

    p = str(path)
    try:
        pf = pq.ParquetFile(p)
        batches = pf.iter_batches(batch_size=batch_size)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: not a Parquet file
        yield ReadError(p, None, "unreadable_file", f"{type(exc).__name__}: {exc}"[:300])
        return
    rowno = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a corrupt row group: the rest of the file is lost
            yield ReadError(p, rowno, "unreadable_row_group", f"{type(exc).__name__}: {exc}"[:300])
            return
        for row in batch.to_pylist():
            try:
                yield row_to_document(row)
            except InputError as exc:
                yield ReadError(p, rowno, "bad_row", str(exc)[:300])
            rowno += 1


def read_parquet_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Strict variant for files interleaf wrote itself: raise ``InputError`` at the first bad row."""
    for item in read_parquet(path):
        if isinstance(item, ReadError):
            raise InputError(f"{item.source}: row {item.position}: {item.reason}: {item.detail}")
        yield item


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def documents_to_table(docs: Iterable[Document], layout: str = "obelics"):
    """A ``pyarrow.Table`` of documents in the OBELICS (JSON strings) or OmniCorpus (structs) layout."""
    import pyarrow as pa

    if layout not in LAYOUTS:
        raise InputError(f"unknown corpus layout {layout!r} ({', '.join(LAYOUTS)})")
    docs = list(docs)
    texts = pa.array([d.texts for d in docs], pa.list_(pa.string()))
    images = pa.array([d.images for d in docs], pa.list_(pa.string()))
    if layout == "obelics":
        metadata = pa.array([_dumps(d.metadata) for d in docs], pa.string())
        general = pa.array([_dumps(d.general_metadata) for d in docs], pa.string())
    else:
        try:
            metadata = pa.array([d.metadata for d in docs])
            general = _general_struct([d.general_metadata for d in docs])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"metadata does not fit one struct schema: {exc}") from None
    return pa.table({"texts": texts, "images": images, "metadata": metadata, "general_metadata": general})


def _general_struct(gms: list[dict]):
    """``general_metadata`` as a struct column; ``filter_scores`` (open-ended keys) as a map."""
    import pyarrow as pa

    gms = [dict(gm) for gm in gms]
    scores = [gm.pop("filter_scores", None) for gm in gms]
    if all(not gm for gm in gms) and all(s is None for s in scores):
        raise InputError("general_metadata is empty in every document")
    arrays, names = [], []
    if any(gms):
        base = pa.array(gms)
        arrays = base.flatten()
        names = [f.name for f in base.type]
    if any(s is not None for s in scores):
        arrays.append(
            pa.array(
                [list(s.items()) if s is not None else None for s in scores],
                pa.map_(pa.string(), pa.float64()),
            )
        )
        names.append("filter_scores")
    return pa.StructArray.from_arrays(arrays, names=names)


def write_parquet(path: str | os.PathLike, docs: Iterable[Document], layout: str = "obelics") -> int:
    """Write documents to one Parquet file; return the number written."""
    import pyarrow.parquet as pq

    table = documents_to_table(docs, layout)
    pq.write_table(table, str(path), compression="zstd")
    return table.num_rows


def write_jsonl(path: str | os.PathLike, docs: Iterable[Document], layout: str = "canonical") -> int:
    """Write one row per line (``canonical``: nested objects; ``obelics``: JSON-string fields; ``mmc4``)."""
    p = str(path)
    opener = gzip.open if p.lower().endswith(".gz") else open
    n = 0
    with opener(p, "wt", encoding="utf-8") as fh:
        for d in docs:
            if layout == "canonical":
                row = d.to_row()
            elif layout == "obelics":
                row = d.to_row()
                row["metadata"] = _dumps(row["metadata"])
                row["general_metadata"] = _dumps(row["general_metadata"])
            elif layout == "mmc4":
                row = to_mmc4(d)
            else:
                raise InputError(f"unknown JSONL layout {layout!r} (canonical, obelics, mmc4)")
            fh.write(_dumps(row) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# MMC4
# ---------------------------------------------------------------------------------------------
def _image_name(url: str, meta: dict | None) -> str:
    if meta and meta.get("sha256"):
        return str(meta["sha256"])
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def to_mmc4(doc: Document) -> dict[str, Any]:
    """The MMC4 row of a document (see the module docstring for the exact mapping)."""
    text_list: list[str] = []
    image_info: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []  # images whose following text is not seen yet
    for text, url, meta in doc.nodes():
        if text is not None:
            for info in waiting:
                info["matched_text_index"] = len(text_list)
            waiting = []
            text_list.append(text)
        else:
            info = {
                "image_name": _image_name(url, meta),
                "raw_url": url,
                "matched_text_index": None,
                "matched_sim": (meta or {}).get("matched_sim"),
                "metadata": dict(meta) if meta is not None else None,
            }
            image_info.append(info)
            waiting.append(info)
    for info in waiting:  # images after the last text node
        info["matched_text_index"] = max(len(text_list) - 1, 0)
        info["after_text"] = True
    row: dict[str, Any] = {
        "url": doc.general_metadata.get("url"),
        "text_list": text_list,
        "image_info": image_info,
        "general_metadata": dict(doc.general_metadata),
    }
    if "similarity_matrix" in doc.general_metadata:
        row["similarity_matrix"] = doc.general_metadata["similarity_matrix"]
    return row


def from_mmc4(row: dict[str, Any]) -> Document:
    """A Document from an MMC4 row (interleaf's own or the original dataset's); InputError if bad."""
    if not isinstance(row, dict):
        raise InputError("MMC4 row must be a JSON object")
    text_list = row.get("text_list")
    image_info = row.get("image_info") or []
    if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
        raise InputError("MMC4 field 'text_list' must be a list of strings")
    if not isinstance(image_info, list):
        raise InputError("MMC4 field 'image_info' must be a list")
    before: dict[int, list[tuple[str, dict]]] = {}
    after: dict[int, list[tuple[str, dict]]] = {}
    for k, info in enumerate(image_info):
        if not isinstance(info, dict):
            raise InputError(f"MMC4 field 'image_info[{k}]' must be an object")
        url = info.get("raw_url")
        if not isinstance(url, str) or not url:
            raise InputError(f"MMC4 field 'image_info[{k}].raw_url' must be a non-empty string")
        idx = info.get("matched_text_index")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < max(len(text_list), 1):
            raise InputError(f"MMC4 field 'image_info[{k}].matched_text_index' out of range: {idx!r}")
        if not text_list:
            raise InputError("MMC4 row has images but an empty 'text_list'")
        meta = info.get("metadata")
        if meta is None:  # an original MMC4 row: keep what it knows about the image
            meta = {"url": url}
            for key in ("image_name", "matched_sim", "face_detections"):
                if key in info:
                    meta[key] = info[key]
        elif not isinstance(meta, dict):
            raise InputError(f"MMC4 field 'image_info[{k}].metadata' must be an object")
        (after if info.get("after_text") else before).setdefault(idx, []).append((url, meta))
    doc = Document()
    for i, text in enumerate(text_list):
        for url, meta in before.get(i, []):
            doc.texts.append(None)
            doc.images.append(url)
            doc.metadata.append(dict(meta))
        doc.add_text(text)
        for url, meta in after.get(i, []):
            doc.texts.append(None)
            doc.images.append(url)
            doc.metadata.append(dict(meta))
    gm = row.get("general_metadata")
    if gm is None:
        gm = {"url": row.get("url")}
        if "could_have_url_duplicate" in row:
            gm["could_have_url_duplicate"] = row["could_have_url_duplicate"]
        if "similarity_matrix" in row:
            gm["similarity_matrix"] = row["similarity_matrix"]
        gm["id"] = hashlib.sha1(str(row.get("url")).encode("utf-8")).hexdigest()
    elif not isinstance(gm, dict):
        raise InputError("MMC4 field 'general_metadata' must be an object")
    doc.general_metadata = dict(gm)
    return doc.validate()


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """Parquet/JSONL files of a corpus directory (sorted), or the file itself."""
    p = Path(path)
    if p.is_dir():
        return sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.name.lower().endswith((".parquet", ".jsonl", ".jsonl.gz"))
        )
    return [p]
