"""Dynamic tiling and image loading, checked against transformers' slow (PIL) GotOcr2 image processor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.errors import InputError
from interleaf.processing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    dynamic_tiles,
    load_image,
    num_tiles,
    preprocess_image,
    preprocess_images,
    tile_grid,
)

got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")


def _reference_processor(max_patches: int):
    return got_ocr2.GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
    )


def _random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_grid_matches_transformers_for_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, size=(1500, 2))]
    # exact ties of aspect ratio (square / 2:1 images of several areas) exercise the tie-break rule
    sizes += [(s, s) for s in (100, 448, 600, 633, 634, 896, 900, 1344, 1400, 2000)]
    sizes += [(2 * s, s) for s in (100, 224, 317, 448, 500, 700, 1000)]
    for max_num in (1, 2, 4, 6, 12, 24):
        for w, h in sizes:
            ref = got_ocr2.get_optimal_tiled_canvas((h, w), (448, 448), 1, max_num)
            assert tile_grid(w, h, 1, max_num) == ref, (w, h, max_num)


def test_candidate_grids_sorted_by_tile_count():
    grids = candidate_grids(1, 12)
    assert grids[0] == (1, 1)
    assert [g[0] * g[1] for g in grids] == sorted(g[0] * g[1] for g in grids)
    assert set(grids) == {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert all(3 <= i * j <= 6 for i, j in candidate_grids(3, 6))


def test_tie_break_prefers_more_tiles_only_for_large_images():
    # squares tie between (1,1), (2,2), (3,3): grow while area > half the grid area
    assert tile_grid(448, 448, 1, 12) == (1, 1)
    assert tile_grid(900, 900, 1, 12) == (2, 2)
    assert tile_grid(1400, 1400, 1, 12) == (3, 3)
    assert num_tiles(900, 900) == 5  # 4 tiles + thumbnail
    assert num_tiles(448, 448) == 1  # one tile: no thumbnail


@pytest.mark.parametrize("seed", range(3))
def test_pixels_match_transformers(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(4):
        w, h = int(rng.integers(8, 1500)), int(rng.integers(8, 1500))
        max_num = int(rng.integers(1, 13))
        image = _random_image(rng, w, h)
        ref = _reference_processor(max_num)(image, return_tensors="pt")
        ours = preprocess_image(image, max_num=max_num)
        assert ours.dtype == torch.float32
        assert ours.shape == ref["pixel_values"].shape, (w, h, max_num)
        assert ours.shape[0] == int(ref["num_patches"][0]) == num_tiles(w, h, 1, max_num)
        torch.testing.assert_close(ours, ref["pixel_values"], atol=1e-5, rtol=0)


def test_tiles_row_major_with_thumbnail_last():
    # a 2x1 image whose left half is red and right half blue -> grid (2,1): red tile, blue tile, thumb
    arr = np.zeros((448, 896, 3), np.uint8)
    arr[:, :448] = (255, 0, 0)
    arr[:, 448:] = (0, 0, 255)
    tiles = dynamic_tiles(Image.fromarray(arr), max_num=6)
    assert len(tiles) == 3
    assert np.asarray(tiles[0])[200, 200].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[200, 200].tolist() == [0, 0, 255]
    thumb = np.asarray(tiles[2])
    assert thumb[200, 50].tolist() == [255, 0, 0] and thumb[200, 400].tolist() == [0, 0, 255]
    px = preprocess_image(Image.fromarray(arr), max_num=6)
    # tile 0 red: normalised R channel = (1 - mean) / std
    assert px[0, 0, 10, 10].item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=1e-6)
    assert px[1, 2, 10, 10].item() == pytest.approx((1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2], abs=1e-6)
    # the tensor path equals cropping the PIL tiles one by one
    for k, tile in enumerate(tiles):
        ref = _reference_processor(1)(tile, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(px[k], ref, atol=1e-5, rtol=0)


def test_several_images_share_the_budget():
    rng = np.random.default_rng(1)
    images = [_random_image(rng, 1300, 900), _random_image(rng, 900, 1300), _random_image(rng, 50, 50)]
    px, counts = preprocess_images(images, max_num=12)
    # per-image budget max(1, 12 // 3) = 4
    assert counts == [num_tiles(1300, 900, 1, 4), num_tiles(900, 1300, 1, 4), 1]
    assert px.shape == (sum(counts), 3, 448, 448)
    torch.testing.assert_close(px[: counts[0]], preprocess_image(images[0], max_num=4))
    # many images: never fewer than one tile each
    _, counts = preprocess_images([images[2]] * 20, max_num=12)
    assert counts == [1] * 20
    # one image keeps the whole budget
    _, counts = preprocess_images(images[:1], max_num=12)
    assert counts == [num_tiles(1300, 900, 1, 12)]


def test_load_image_paths_bytes_and_modes(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGBA", (30, 20), (10, 20, 30, 128)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert load_image(path.read_bytes()).size == (30, 20)
    assert load_image(Image.new("L", (5, 6))).mode == "RGB"
    assert load_image(str(path)).getpixel((0, 0)) == (10, 20, 30)


def test_palette_images_with_transparency_load_without_a_pil_warning(tmp_path):
    # GIFs and PNGs with per-index transparency made PIL warn on stderr under `interleaf chat`
    # and `eval make-mini mmniah`; the RGB pixels must stay those of the palette
    img = Image.new("P", (4, 2), 1)
    img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    img.putpixel((0, 0), 2)
    path = tmp_path / "p.png"
    img.save(path, transparency=bytes([0, 255, 128]))
    for source in (path, path.read_bytes(), Image.open(path)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rgb = load_image(source)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((0, 0)) == (10, 200, 10) and rgb.getpixel((1, 0)) == (200, 10, 10)


def test_mmniah_haystack_palette_image_pastes_without_a_pil_warning(tmp_path):
    import random

    from interleaf.eval.mmniah_make import _paste, draw_shape

    img = Image.new("P", (240, 240), 1)
    img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    path = tmp_path / "hay.png"
    img.save(path, transparency=bytes([0, 255, 128]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user's haystack image went through a bare convert("RGB")
        out = _paste(str(path), [draw_shape("circle", "red")], random.Random(0))
    assert out.mode == "RGB" and out.size == (240, 240)


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match="missing.jpg"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match="junk.png"):
        load_image(junk)
    # a truncated JPEG: valid header, data cut short
    good = tmp_path / "good.jpg"
    _random_image(np.random.default_rng(0), 200, 200).save(good, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:600])
    with pytest.raises(InputError, match="cut.jpg") as info:
        load_image(cut)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_an_empty_in_memory_image_is_an_input_error():
    with pytest.raises(InputError, match=r"empty image \(0x0 pixels\)"):  # ZeroDivisionError in tiling before
        preprocess_images([Image.new("RGB", (0, 0))], max_num=6)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_zone = tmp_path / "warn.png"  # 1600 px: PIL only warns (between 1x and 2x the limit)
    Image.new("RGB", (40, 40)).save(warn_zone)
    bomb = tmp_path / "bomb.png"  # 10000 px: PIL raises
    Image.new("RGB", (100, 100)).save(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    for p in (warn_zone, bomb):
        with pytest.raises(InputError, match=f"decompression bomb.*{p.name}"):
            load_image(p)
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(Image.new("RGB", (40, 40)))
    assert load_image(small).size == (20, 20)


@pytest.mark.parametrize(
    "min_num, max_num, message",
    [(1, 0, "max_num must be a positive int"), (0, 4, "min_num must be a positive int"),
     (3, 2, r"min_num \(3\) is above max_num \(2\)"), (1, 2.0, "max_num must be a positive int")],
)  # fmt: skip
def test_empty_tile_budget_is_refused(min_num, max_num, message):
    """Upstream silently falls back to a single tile when no grid fits; here it is an error."""
    image = Image.new("RGB", (900, 300))
    with pytest.raises(InputError, match=message):
        preprocess_image(image, max_num=max_num, min_num=min_num)
    with pytest.raises(InputError, match=message):
        preprocess_images([image, image], max_num=max_num, min_num=min_num)
    with pytest.raises(InputError, match=message):
        tile_grid(900, 300, min_num, max_num)
