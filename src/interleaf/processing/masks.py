"""Object masks in COCO's forms: polygons and run-length encodings (RLE), read, checked, drawn and
written with pycocotools.

A record's mask is what a COCO annotation's ``segmentation`` holds, in the image's pixels:

* polygons ``[[x1, y1, x2, y2, x3, y3, ...], ...]`` (one object may be several polygons; each at
  least 3 points), drawn by pycocotools as ``COCO.annToRLE`` draws them;
* an RLE ``{"size": [height, width], "counts": ...}``, ``counts`` COCO's compressed string or the
  uncompressed list of run lengths (column-major, starting with a run of 0s).

Everything is held as a compressed RLE (``counts`` bytes, pycocotools' own form) and written to
JSON with ``counts`` as text (:func:`json_rle`), which pycocotools reads back as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from interleaf.errors import InputError, is_number

# how far off the image (in multiples of its larger side) a polygon point may lie
POLYGON_REACH = 10
FORMS = "polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE {size: [h, w], counts}"


def rle_counts(counts: str) -> list[int]:
    """COCO's compressed RLE string as its run lengths (the format pycocotools' ``rleFrString``
    reads: 6-bit groups offset by 48, low 5 bits of value and a continuation bit, sign extended;
    from the third run on, each is stored as its difference to the run two before). ValueError for
    a string that is not one, or holds a negative run."""
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {char!r} is not in COCO's RLE alphabet")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:  # more groups of this run follow
            continue
        if c & 0x10:  # negative: sign-extend
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} is negative ({value})")
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the string ends inside a run")
    return runs


def object_mask(raw: Any, name: str, width: int, height: int) -> dict[str, Any]:
    """A record's mask (polygons or an RLE, see the module docstring) on a ``width`` x ``height``
    image as a compressed RLE ``{"size": [height, width], "counts": bytes}``, or a one-line
    InputError naming ``name``. A mask with no pixel on the image is refused (as a box off the image
    is): it would teach the detector nothing about its object."""
    from pycocotools import mask as coco_mask

    if isinstance(raw, dict):
        size, counts = raw.get("size"), raw.get("counts")
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        ):
            raise InputError(f"{name}: an RLE needs size [height, width], integers")
        if size != [height, width]:
            raise InputError(
                f"{name}: RLE size {size} is not the image's [height, width] [{height}, {width}]"
            )
        if isinstance(counts, str):
            try:
                runs = rle_counts(counts)
            except ValueError as exc:
                raise InputError(f"{name}: counts: not a COCO compressed RLE ({exc})") from None
        elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            runs = counts
            if any(v < 0 for v in runs):
                raise InputError(f"{name}: counts: a negative run length")
        else:
            raise InputError(f"{name}: counts: must be COCO's compressed string or a list of run lengths")
        # pycocotools decodes without bounds checks: runs that overrun the image would write past it
        if sum(runs) != height * width:
            raise InputError(
                f"{name}: counts: the runs cover {sum(runs)} pixels, not {height}x{width} = {height * width}"
            )
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    elif isinstance(raw, list) and raw and all(isinstance(p, list) for p in raw):
        # pycocotools draws every edge's points (at 5x scale): a wild coordinate would take memory
        # in proportion (gigabytes, or the OOM killer, for 1e8) rather than fail
        limit = POLYGON_REACH * max(width, height)
        for j, poly in enumerate(raw):
            if not all(is_number(v) for v in poly):
                raise InputError(f"{name}[{j}]: a polygon is [x1, y1, x2, y2, ...], numbers")
            # pycocotools would read 4 numbers as a box, and draws nothing for fewer than 3 points
            if len(poly) < 6 or len(poly) % 2:
                raise InputError(
                    f"{name}[{j}]: a polygon needs 3 or more (x, y) points, got {len(poly)} numbers"
                )
            far = next((v for v in poly if abs(v) > limit), None)
            if far is not None:
                raise InputError(
                    f"{name}[{j}]: coordinate {float(far)} lies far outside the {width}x{height} image "
                    f"(more than {POLYGON_REACH} x its larger side)"
                )
        rle = coco_mask.merge(coco_mask.frPyObjects([[float(v) for v in p] for p in raw], height, width))
    else:
        raise InputError(f"{name}: must be {FORMS}")
    if int(coco_mask.area(rle)) == 0:
        raise InputError(f"{name}: covers no pixel of the {width}x{height} image")
    return {"size": [height, width], "counts": rle["counts"]}


def decode_masks(rles: list[dict[str, Any]]) -> torch.Tensor:
    """Compressed RLEs of one size (h, w) as a bool tensor [n, h, w]."""
    from pycocotools import mask as coco_mask

    if not rles:
        return torch.zeros((0, 0, 0), dtype=torch.bool)
    stack = coco_mask.decode(list(rles))  # [h, w, n]
    return torch.from_numpy(np.ascontiguousarray(stack.transpose(2, 0, 1))).bool()


def json_rle(mask: np.ndarray | torch.Tensor | dict[str, Any]) -> dict[str, Any]:
    """A mask [h, w] (bool or 0/1) or a compressed RLE, as the JSON-ready COCO RLE ``{"size": [h, w],
    "counts": str}`` (pycocotools' encoding, counts as text)."""
    from pycocotools import mask as coco_mask

    if isinstance(mask, dict):
        rle = mask
    else:
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [n, H, W] resized to ``size`` (height, width) by nearest neighbour, as transformers'
    image processors resize a COCO annotation's masks along with its image (PIL ``NEAREST``): bool
    [n, height, width]."""
    from PIL import Image

    height, width = size
    if masks.shape[-2:] == (height, width):
        return masks.bool()
    out = [
        np.asarray(Image.fromarray(m.to(torch.uint8).cpu().numpy()).resize((width, height), Image.NEAREST))
        for m in masks
    ]
    if not out:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.stack(out)).bool()
