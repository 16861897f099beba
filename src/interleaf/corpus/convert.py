"""Degrading interleaved documents (OmniCorpus Fig. 1): pure text, image-text pairs, MMC4.

- ``to_text(doc)``: ``{id, url, text}`` with the text nodes joined by blank lines (images
  dropped), the record a text-only corpus (datatrove/Dolma style) expects; None when no text.
- ``to_pairs(doc)``: one record per image ``{id, doc_id, url, image, alt_text, text, text_before,
  text_after, position, metadata}``. ``text_before`` is the last paragraph of the nearest text node
  before the image, ``text_after`` the first paragraph of the nearest text node after it (each
  None if there is none; other images in between do not stop the search). ``text`` is the nearer
  of the two by node distance; on a tie the text after (captions and figure descriptions usually
  follow the image); when both are missing, the image's alt text, else "". ``position`` is the
  image's index in the document's node list and ``id`` is ``"<doc id>#<position>"``.
- ``to_mmc4(doc)``: the MMC4 row (``text_list``, ``image_info`` with ``matched_text_index``), see
  ``interleaf.corpus.formats`` for the exact, lossless mapping and ``from_mmc4`` for the inverse.
"""

from __future__ import annotations

from typing import Any

from interleaf.corpus.document import Document
from interleaf.corpus.formats import from_mmc4, to_mmc4

__all__ = ["to_text", "to_pairs", "to_mmc4", "from_mmc4"]


def to_text(doc: Document) -> dict[str, Any] | None:
    """The pure-text record of a document (None when it has no text)."""
    text = doc.text
    if not text:
        return None
    return {"id": doc.id, "url": doc.url, "text": text}


def to_pairs(doc: Document) -> list[dict[str, Any]]:
    """One image-text pair per image node (see the module docstring for which text is chosen)."""
    n = len(doc.texts)
    # nearest text node index at or before / after each position
    prev_text: list[int | None] = [None] * n
    last = None
    for i, t in enumerate(doc.texts):
        prev_text[i] = last
        if t is not None:
            last = i
    next_text: list[int | None] = [None] * n
    nxt = None
    for i in range(n - 1, -1, -1):
        next_text[i] = nxt
        if doc.texts[i] is not None:
            nxt = i
    pairs = []
    for i, (url, meta) in enumerate(zip(doc.images, doc.metadata)):
        if url is None:
            continue
        b, a = prev_text[i], next_text[i]
        before = doc.texts[b].split("\n\n")[-1] if b is not None else None
        after = doc.texts[a].split("\n\n")[0] if a is not None else None
        if before is not None and (after is None or i - b < a - i):
            text = before
        elif after is not None:
            text = after
        else:
            text = (meta or {}).get("alt_text") or ""
        pairs.append(
            {
                "id": f"{doc.id}#{i}",
                "doc_id": doc.id,
                "url": doc.url,
                "image": url,
                "alt_text": (meta or {}).get("alt_text"),
                "text": text,
                "text_before": before,
                "text_after": after,
                "position": i,
                "metadata": dict(meta) if meta else {},
            }
        )
    return pairs
