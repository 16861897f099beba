"""Image loading and InternVL dynamic high-resolution tiling.

An image becomes a stack of ``image_size`` x ``image_size`` tiles (448 px for every model of the family):
the grid of ``cols x rows`` tiles whose aspect ratio is closest to the image's is chosen among all
grids with ``min_num <= cols * rows <= max_num``; the image is resized (PIL bicubic) to exactly cover
that grid and cut row-major; when there is more than one tile, a thumbnail of the whole image
(resized to one tile) is appended last. Tiles are normalised with the ImageNet mean/std.

This follows InternVL's ``dynamic_preprocess`` and transformers' ``GotOcr2ImageProcessor`` (slow, PIL)
bit for bit; the tests compare against the latter.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from interleaf.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike | bytes | Image.Image


# ----------------------------------------------------------------------------------------------------
# loading


def _describe(source: ImageInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput) -> Image.Image:
    """Open an image (path, raw bytes or a PIL image) and return it decoded, in RGB.

    Missing, unreadable, corrupt or truncated files raise a one-line ``InputError`` naming the file.
    Images larger than PIL's ``Image.MAX_IMAGE_PIXELS`` are refused as possible decompression bombs
    (PIL only warns between 1x and 2x that limit; here the warning is an error too).
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, name)
        return source if source.mode == "RGB" else to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(f"image not found: {path}")
        if os.path.isdir(path):
            raise InputError(f"image path is a directory: {path}")
        fp: str | io.BytesIO = path
    elif isinstance(source, bytes):
        fp = io.BytesIO(source)
    else:
        raise InputError(
            f"unsupported image input of type {type(source).__name__} (want a path, bytes or PIL image)"
        )
    try:
        with warnings.catch_warnings():
            # Turn PIL's "could be decompression bomb" warning into an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.load()  # force decoding now so that truncated files fail here
                image = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image refused as a possible decompression bomb: {name} ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(f"not a readable image (unknown or corrupt format): {name}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"corrupt or unreadable image: {name} ({first})") from None
    return image


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB. A palette image with transparency goes through RGBA (same RGB values): PIL's
    direct conversion warns on stderr for every such GIF or PNG."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.startswith("I;16"):  # 16-bit grey: PIL's conversion clips at 255 (mid-grey -> white)
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
    return img.convert("RGB")


def _check_pixels(size: tuple[int, int], name: str) -> None:
    if min(size) < 1:  # an in-memory PIL image can be 0 pixels wide; tiling would divide by zero
        raise InputError(f"empty image ({size[0]}x{size[1]} pixels): {name}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise InputError(
            f"image refused as a possible decompression bomb: {name} "
            f"({size[0]}x{size[1]} pixels exceeds the limit of {limit})"
        )


# ----------------------------------------------------------------------------------------------------
# dynamic tiling


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with ``min_num <= cols*rows <= max_num``, sorted by tile count.

    Upstream builds the candidates as a Python set and sorts it stably by ``cols*rows``; we do the same
    so the order within one tile count is identical (it only matters when ``min_num > 1``).
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_best_grid(
    width: int, height: int, grids: Sequence[tuple[int, int]], image_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to ``width / height``.

    On an exact tie with the best so far, the later (larger) grid wins while the image area is more
    than half the area of that grid, so small images do not get blown up into many tiles.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def check_tile_budget(min_num: int, max_num: int) -> None:
    """Refuse a tile budget with no candidate grid (upstream silently falls back to one tile)."""
    for name, value in (("min_num", min_num), ("max_num", max_num)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int (tiles per image), got {value!r}")
    if min_num > max_num:
        raise InputError(f"min_num ({min_num}) is above max_num ({max_num}): no tile grid fits")


def tile_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) grid dynamic tiling uses for an image of this size."""
    check_tile_budget(min_num, max_num)
    return find_best_grid(width, height, candidate_grids(min_num, max_num), image_size)


def num_tiles(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> int:
    """How many tiles (thumbnail included) ``dynamic_tiles`` makes for an image of this size."""
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def _normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], scaled to [0, 1] then ImageNet-normalised.

    In numpy, not torch: single-threaded with the GIL released, so the data and tiling threads do not
    each start a team of intra-op threads beside a busy training or generation loop (same float32
    operations in the same order as torch's, so the values are identical)."""
    x = np.moveaxis(pixels, -1, -3).astype(np.float32)  # keeps the HWC memory order, as before
    np.divide(x, np.float32(255.0), out=x)
    np.subtract(x, _MEAN, out=x)
    np.divide(x, _STD, out=x)
    return torch.from_numpy(x)


def dynamic_tiles(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut an RGB PIL image into tiles (PIL images), thumbnail last when there is more than one tile."""
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop(((k % cols) * image_size, (k // cols) * image_size,
                      (k % cols + 1) * image_size, (k // cols + 1) * image_size))
        for k in range(cols * rows)
    ]  # fmt: skip
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def preprocess_image(
    image: ImageInput,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> torch.Tensor:
    """Load, tile and normalise one image.

    Returns:
        pixel_values: float32 [num_tiles, 3, image_size, image_size].
        With ``dynamic=False`` the whole image is resized to a single tile.
    """
    image = load_image(image)
    if not dynamic:
        min_num = max_num = 1
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    # [rows*S, cols*S, 3] -> [rows*cols, S, S, 3], row-major: identical to cropping tile by tile.
    arr = np.asarray(resized).reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 1, 3, 4)
    arr = arr.reshape(rows * cols, image_size, image_size, 3)
    if use_thumbnail and rows * cols > 1:
        thumb = np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
        arr = np.concatenate([arr, thumb[None]], axis=0)
    return _normalize(arr)


def background_threads() -> int:
    """Threads for image loading and tiling beside a running model: half the cores, so the model's
    own threads keep theirs, at most 8 (a 2-core machine gets 1: serial)."""
    return min(8, (os.cpu_count() or 1) // 2)


def images_budget(max_num: int, n_images: int) -> int:
    """Per-image tile budget when several images share one prompt: ``max(1, max_num // n_images)``."""
    return max(1, max_num // max(1, n_images))


def preprocess_images(
    images: Sequence[ImageInput],
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """Tile several images that go into one prompt, sharing the ``max_num`` budget.

    Returns:
        pixel_values: float32 [sum(num_tiles), 3, S, S] (tiles of all images, in order) and
        num_tiles: the tile count of each image.
    """
    check_tile_budget(min_num, max_num)
    per_image = max_num if len(images) <= 1 else images_budget(max_num, len(images))
    tensors = [
        preprocess_image(im, per_image, min(min_num, per_image), image_size, use_thumbnail, dynamic)
        for im in images
    ]
    if not tensors:
        return torch.empty(0, 3, image_size, image_size), []
    return torch.cat(tensors, dim=0), [t.shape[0] for t in tensors]
