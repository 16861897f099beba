"""interleaf.processing: images (dynamic tiling), video (segment sampling), chat templates, prompts."""

from interleaf.processing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dynamic_tiles,
    load_image,
    num_tiles,
    preprocess_image,
    preprocess_images,
    tile_grid,
)
from interleaf.processing.prompt import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    build_prompt,
    expand_image_placeholders,
)
from interleaf.processing.templates import TEMPLATES, ChatTemplate, TemplatePart, get_template
from interleaf.processing.video import load_video, read_video_frames, segment_indices

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_PLACEHOLDER",
    "IMG_CONTEXT_TOKEN",
    "IMG_END_TOKEN",
    "IMG_START_TOKEN",
    "TEMPLATES",
    "ChatTemplate",
    "TemplatePart",
    "build_prompt",
    "dynamic_tiles",
    "expand_image_placeholders",
    "get_template",
    "load_image",
    "load_video",
    "num_tiles",
    "preprocess_image",
    "preprocess_images",
    "read_video_frames",
    "segment_indices",
    "tile_grid",
]
