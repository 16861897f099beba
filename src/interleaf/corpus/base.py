"""Pipeline building blocks (datatrove style): raw inputs, read errors, steps and their statistics.

A *reader* is a generator yielding ``RawPage`` (HTML to extract), ``Document`` (an existing
corpus row) or ``ReadError`` (one bad record: counted, never raised). A *step* maps one
``Document`` to a (possibly modified) ``Document`` or to a ``Drop`` with a reason. Calling
``step(doc)`` (rather than ``step.process(doc)``) keeps the step's ``StepStats`` up to date and
turns an unexpected exception into an error ``Drop``, so that for every step, always::

    docs_in == docs_out + sum(excluded_by_reason) + sum(errors_by_reason)
    images_in == images_out + sum(images_removed_by_reason) + images_in_dropped_docs
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from interleaf.corpus.document import Document


@dataclass
class RawPage:
    """One fetched web page before extraction (from a WARC response record or an HTML file)."""

    url: str
    html: bytes
    content_type: str = "text/html"
    charset: str | None = None  # from the HTTP header, if any; extraction decodes with it
    crawl_date: str | None = None  # ISO 8601
    warc_filename: str | None = None
    warc_record_offset: int | None = None
    warc_record_length: int | None = None
    record_id: str | None = None


@dataclass
class ReadError:
    """A record a reader could not turn into a page or document. ``position``: record offset/row number."""

    source: str
    position: int | str | None
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "position": self.position,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class Drop:
    """A step's verdict that a document leaves the pipeline. ``error``: it failed rather than was filtered."""

    reason: str
    detail: str = ""
    error: bool = False


@dataclass
class StepStats:
    """Counters of one step (or one stage); mergeable across shards and workers."""

    name: str = ""
    docs_in: int = 0
    docs_out: int = 0
    excluded_by_reason: Counter = field(default_factory=Counter)
    errors_by_reason: Counter = field(default_factory=Counter)
    images_in: int = 0
    images_out: int = 0
    images_removed_by_reason: Counter = field(default_factory=Counter)
    images_in_dropped_docs: int = 0
    time_s: float = 0.0

    @property
    def excluded(self) -> int:
        return sum(self.excluded_by_reason.values())

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())

    def balanced(self) -> bool:
        """True when every document and image that came in is accounted for."""
        docs_ok = self.docs_in == self.docs_out + self.excluded + self.errors
        imgs_ok = self.images_in == (
            self.images_out + sum(self.images_removed_by_reason.values()) + self.images_in_dropped_docs
        )
        return docs_ok and imgs_ok

    def run(self, fn: Any, item: Any, label: str) -> Any:
        """``fn(item)`` counted and timed here; an exception becomes ``Drop(error=True)`` (reason
        ``label:ExceptionType``), and a drop is counted by its reason. Image counts are the caller's."""
        self.docs_in += 1
        t0 = time.perf_counter()
        try:
            out = fn(item)
        except Exception as exc:  # noqa: BLE001 - one bad document must not stop a run
            out = Drop(reason=f"{label}:{type(exc).__name__}", detail=str(exc)[:500], error=True)
        self.time_s += time.perf_counter() - t0
        if isinstance(out, Drop):
            (self.errors_by_reason if out.error else self.excluded_by_reason)[out.reason] += 1
        else:
            self.docs_out += 1
        return out

    def merge(self, other: StepStats) -> StepStats:
        """Add ``other``'s counters into this one (in place) and return self."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.excluded_by_reason.update(other.excluded_by_reason)
        self.errors_by_reason.update(other.errors_by_reason)
        self.images_in += other.images_in
        self.images_out += other.images_out
        self.images_removed_by_reason.update(other.images_removed_by_reason)
        self.images_in_dropped_docs += other.images_in_dropped_docs
        self.time_s += other.time_s
        if not self.name:
            self.name = other.name
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "excluded": self.excluded,
            "errors": self.errors,
            "excluded_by_reason": dict(sorted(self.excluded_by_reason.items())),
            "errors_by_reason": dict(sorted(self.errors_by_reason.items())),
            "images_in": self.images_in,
            "images_out": self.images_out,
            "images_removed_by_reason": dict(sorted(self.images_removed_by_reason.items())),
            "images_in_dropped_docs": self.images_in_dropped_docs,
            "time_s": round(self.time_s, 6),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(
            name=d.get("name", ""),
            docs_in=int(d.get("docs_in", 0)),
            docs_out=int(d.get("docs_out", 0)),
            excluded_by_reason=Counter(d.get("excluded_by_reason", {})),
            errors_by_reason=Counter(d.get("errors_by_reason", {})),
            images_in=int(d.get("images_in", 0)),
            images_out=int(d.get("images_out", 0)),
            images_removed_by_reason=Counter(d.get("images_removed_by_reason", {})),
            images_in_dropped_docs=int(d.get("images_in_dropped_docs", 0)),
            time_s=float(d.get("time_s", 0.0)),
        )


class Step:
    """One per-document pipeline step. Subclasses set ``name`` and implement ``process``.

    ``process`` returns the (possibly modified) document or a ``Drop``. A step that removes image
    nodes from a kept document records each removal with ``self.remove_image(reason)``.
    Constructor keyword arguments are the step's thresholds, so a YAML config can set them.
    """

    name: str = "step"

    def __init__(self) -> None:
        self.stats = StepStats(name=self.name)

    def process(self, doc: Document) -> Document | Drop:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove_image(self, reason: str, n: int = 1) -> None:
        """Record that ``n`` image nodes were removed from the current document for ``reason``."""
        pending = self.__dict__.setdefault("_pending", Counter())
        pending[reason] += n

    def __call__(self, doc: Document) -> Document | Drop:
        """Run ``process`` with bookkeeping; exceptions become ``Drop(error=True)``."""
        st = self.stats
        n_img = doc.n_images
        st.images_in += n_img
        pending = self.__dict__.setdefault("_pending", Counter())
        pending.clear()
        out = st.run(self.process, doc, self.name)
        if isinstance(out, Drop):
            # removals recorded before the drop count as images of the dropped document
            pending.clear()
            st.images_in_dropped_docs += n_img
            return out
        n_out = out.n_images
        st.images_out += n_out
        unrecorded = n_img - n_out - sum(pending.values())
        if unrecorded > 0:  # a step that dropped images without saying why: keep the books balanced
            pending[self.name] += unrecorded
        if pending:
            st.images_removed_by_reason.update(pending)
            pending.clear()
        return out

    def config(self) -> dict[str, Any]:
        """The step's thresholds (public attributes set by the constructor), for logging."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "stats"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def run_steps(doc: Document, steps: list[Step]) -> Document | Drop:
    """Apply ``steps`` in order; stop at the first ``Drop``."""
    for step in steps:
        out = step(doc)
        if isinstance(out, Drop):
            return out
        doc = out
    return doc
