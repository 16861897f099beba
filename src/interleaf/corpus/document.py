"""The interleaved document: OmniCorpus / OBELICS aligned-list layout.

A document is a sequence of nodes in page order. Node ``i`` is either a text chunk
(``texts[i]`` is a string, ``images[i]`` is None, ``metadata[i]`` is None) or an image
(``images[i]`` is the resolved image URL, ``texts[i]`` is None, ``metadata[i]`` is the image
metadata dict). This is the layout of ``HuggingFaceM4/OBELICS`` and ``OpenGVLab/OmniCorpus-CC``
(the OpenFlamingo loader asserts ``len(images) == len(texts)`` and one non-null per position).

``general_metadata`` keys (all optional except ``id``):
    id, url, domain, crawl_date (ISO 8601 string), warc_filename, warc_record_offset,
    warc_record_length (when read from a WARC), title, filter_scores (dict name -> number: the
    text filters record what they measured as ``'<filter>.<quantity>'``, e.g.
    ``'gopher_quality.mean_word_length'``; one flat mapping, the OmniCorpus layout's
    ``map<string, float64>``).
Image metadata keys:
    url (resolved absolute URL, equal to ``images[i]``), src (the attribute as written),
    alt_text, width, height (from the page's attributes, may be None); after fetching:
    real_width, real_height, sha256, p_hash, d_hash, bytes_path.

The canonical row (``to_row`` / ``from_row``) is a plain JSON-able dict with these four keys;
``from_row`` also accepts OBELICS rows whose ``metadata`` / ``general_metadata`` are JSON strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from interleaf.errors import InputError

IMAGE_METADATA_KEYS = (
    "url",
    "src",
    "alt_text",
    "width",
    "height",
    "real_width",
    "real_height",
    "sha256",
    "p_hash",
    "d_hash",
    "bytes_path",
)


@dataclass
class Document:
    """One interleaved image-text document (aligned lists, see the module docstring)."""

    texts: list[str | None] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)
    metadata: list[dict | None] = field(default_factory=list)
    general_metadata: dict = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    def add_text(self, text: str) -> None:
        """Append a text node."""
        self.texts.append(text)
        self.images.append(None)
        self.metadata.append(None)

    def add_image(self, url: str, meta: dict | None = None) -> None:
        """Append an image node; ``meta['url']`` is set to ``url`` when absent."""
        meta = dict(meta or {})
        meta.setdefault("url", url)
        self.texts.append(None)
        self.images.append(url)
        self.metadata.append(meta)

    def nodes(self) -> Iterator[tuple[str | None, str | None, dict | None]]:
        """Yield ``(text, image_url, image_metadata)`` per position."""
        return zip(self.texts, self.images, self.metadata)

    def select(self, keep: list[bool]) -> Document:
        """A new document with only the positions where ``keep[i]`` is true (same general metadata)."""
        return Document(
            texts=[t for t, k in zip(self.texts, keep) if k],
            images=[x for x, k in zip(self.images, keep) if k],
            metadata=[m for m, k in zip(self.metadata, keep) if k],
            general_metadata=self.general_metadata,
        )

    def copy(self) -> Document:
        """A copy whose lists and metadata dicts can be changed without touching this one."""
        gm = dict(self.general_metadata)
        if isinstance(gm.get("filter_scores"), dict):  # filters add to it in place
            gm["filter_scores"] = dict(gm["filter_scores"])
        return Document(
            texts=list(self.texts),
            images=list(self.images),
            metadata=[dict(m) if m is not None else None for m in self.metadata],
            general_metadata=gm,
        )

    # ---- accessors ----------------------------------------------------------------------
    @property
    def id(self) -> str:
        return str(self.general_metadata.get("id", ""))

    @property
    def url(self) -> str:
        return str(self.general_metadata.get("url") or "")

    @property
    def n_images(self) -> int:
        return sum(1 for x in self.images if x is not None)

    @property
    def n_texts(self) -> int:
        return sum(1 for t in self.texts if t is not None)

    @property
    def text(self) -> str:
        """All text nodes joined by blank lines (the pure-text view used by text filters)."""
        return "\n\n".join(t for t in self.texts if t is not None)

    @property
    def image_urls(self) -> list[str]:
        return [x for x in self.images if x is not None]

    def __len__(self) -> int:
        return len(self.texts)

    # ---- checking -----------------------------------------------------------------------
    def validate(self) -> Document:
        """Raise ``InputError`` naming the offending field if the layout is broken; return self."""
        where = f"document {self.id!r}" if self.id else "document"
        for name in ("texts", "images", "metadata"):
            if not isinstance(getattr(self, name), list):
                raise InputError(f"{where}: field {name!r} must be a list")
        if not isinstance(self.general_metadata, dict):
            raise InputError(f"{where}: field 'general_metadata' must be a dict")
        n = len(self.texts)
        if len(self.images) != n or len(self.metadata) != n:
            raise InputError(
                f"{where}: fields 'texts', 'images', 'metadata' must have the same length "
                f"(got {n}, {len(self.images)}, {len(self.metadata)})"
            )
        for i, (t, x, m) in enumerate(zip(self.texts, self.images, self.metadata)):
            if (t is None) == (x is None):
                raise InputError(
                    f"{where}: position {i}: exactly one of texts[{i}] / images[{i}] must be set"
                )
            if t is not None:
                if not isinstance(t, str):
                    raise InputError(f"{where}: field 'texts[{i}]' must be a string")
                if m is not None:
                    raise InputError(f"{where}: field 'metadata[{i}]' must be null at a text position")
            else:
                if not isinstance(x, str):
                    raise InputError(f"{where}: field 'images[{i}]' must be a string URL")
                if not isinstance(m, dict):
                    raise InputError(f"{where}: field 'metadata[{i}]' must be a dict at an image position")
        scores = self.general_metadata.get("filter_scores")
        if scores is not None and not isinstance(scores, dict):
            raise InputError(f"{where}: field 'general_metadata.filter_scores' must be a dict")
        return self

    # ---- rows ---------------------------------------------------------------------------
    def to_row(self) -> dict[str, Any]:
        """The canonical JSON-able row: ``{texts, images, metadata, general_metadata}``."""
        return {
            "texts": list(self.texts),
            "images": list(self.images),
            "metadata": [dict(m) if m is not None else None for m in self.metadata],
            "general_metadata": dict(self.general_metadata),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Document:
        """Build a document from a canonical, OBELICS (JSON-string fields) or OmniCorpus (struct) row.

        Raises ``InputError`` naming the field when the row is not a valid document.
        """
        if not isinstance(row, dict):
            raise InputError(f"row must be a mapping, got {type(row).__name__}")
        for key in ("texts", "images"):
            if key not in row:
                raise InputError(f"row has no field {key!r}")
        texts = _as_list(row["texts"], "texts")
        images = _as_list(row["images"], "images")
        meta_raw = row.get("metadata")
        if isinstance(meta_raw, (str, bytes)):
            meta_raw = _json_field(meta_raw, "metadata")
        metadata = [None] * len(texts) if meta_raw is None else _as_list(meta_raw, "metadata")
        gm = row.get("general_metadata")
        if isinstance(gm, (str, bytes)):
            gm = _json_field(gm, "general_metadata")
        if gm is None:
            gm = {}
        if not isinstance(gm, dict):
            raise InputError("field 'general_metadata' must be a dict or a JSON object string")
        if len(metadata) != len(texts):
            raise InputError(f"field 'metadata' has {len(metadata)} entries for {len(texts)} positions")
        fixed: list[dict | None] = []
        for i, (t, x, m) in enumerate(zip(texts, images, metadata)):
            if isinstance(m, str):
                m = _json_field(m, f"metadata[{i}]")
            if t is not None and x is None:
                m = None  # struct columns fill text positions with null structs or all-null dicts
            elif x is not None and m is None:
                m = {"url": x}
            fixed.append(m)
        doc = cls(texts=texts, images=images, metadata=fixed, general_metadata=dict(gm))
        return doc.validate()

    def to_json(self) -> str:
        return json.dumps(self.to_row(), ensure_ascii=False, separators=(",", ":"))


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):  # numpy arrays from pandas / pyarrow
        return list(value.tolist())
    raise InputError(f"field {name!r} must be a list, got {type(value).__name__}")


def _json_field(value: str | bytes, name: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"field {name!r} is not valid JSON: {exc}") from None
