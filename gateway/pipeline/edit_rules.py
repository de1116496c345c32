"""Rules of ``POST /v1/images/edits`` (SPEC §2.1) beyond the shared per-model rules: the files.

1 to 16 images (``image`` or ``image[]``), each PNG, JPEG or WebP by its magic bytes; dall-e-2
takes exactly one square PNG under 4 MB; an optional ``mask`` must be a PNG of the first image's
size where both sizes can be read from the headers. Text fields go through
``request.form_fields`` and ``request.validate_image_request``, as generations do.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.errors import InvalidRequest, MissingParameter
from gateway.pipeline.image_probe import PROBE_BYTES, image_format, image_size
from gateway.pipeline.request import EDITS, ImageRequest, form_fields, validate_image_request
from gateway.upstream.form_body import FilePart

IMAGE_FIELDS = ("image", "image[]")
FILE_FIELDS = (*IMAGE_FIELDS, "mask")
MAX_IMAGES = 16
DALLE2_MAX_BYTES = 4 * 1024 * 1024


def validate_edit(fields: list[tuple[str, str]], files: list[FilePart], settings: Settings) -> ImageRequest:
    """The checked edit, or ``InvalidRequest``/``MissingParameter`` naming the first bad field."""
    for name, _ in fields:
        if name in FILE_FIELDS:
            raise InvalidRequest(f"'{name}' must be a file upload, not a text field.", param=name)
    for part in files:
        if part.field not in FILE_FIELDS:
            raise InvalidRequest(f"'{part.field}' must be a text field, not a file upload.", param=part.field)
    images = [f for f in files if f.field in IMAGE_FIELDS]
    masks = [f for f in files if f.field == "mask"]
    request = validate_image_request(form_fields(fields), settings, route=EDITS, input_images=len(images))
    if not images:
        raise MissingParameter("Missing required parameter: 'image'.", param="image")
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(f"Invalid 'image': at most {MAX_IMAGES} images, but got {len(images)}.",
                             param="image")
    sizes = [_check_image(part, request) for part in images]
    if len(masks) > 1:
        raise InvalidRequest("Invalid 'mask': it was given twice.", param="mask")
    if masks:
        _check_mask(masks[0], sizes[0], request)
    return request


def _check_image(part: FilePart, request: ImageRequest) -> tuple[int, int] | None:
    head = part.head(PROBE_BYTES)
    fmt = image_format(head)
    if fmt is None:
        raise InvalidRequest(f"Invalid image file '{part.filename}': its content is not PNG, JPEG or WebP.",
                             param="image")
    size = image_size(head)
    if request.family != "dall-e-2":
        return size
    if request.input_images != 1:
        raise InvalidRequest("dall-e-2 edits take exactly one image.", param="image")
    if fmt != "png" or part.size >= DALLE2_MAX_BYTES:
        raise InvalidRequest(f"Invalid image file '{part.filename}': dall-e-2 needs a PNG under 4 MB.",
                             param="image")
    if size is None or size[0] != size[1]:
        raise InvalidRequest(f"Invalid image file '{part.filename}': dall-e-2 needs a square image.",
                             param="image")
    return size


def _check_mask(part: FilePart, image_size_: tuple[int, int] | None, request: ImageRequest) -> None:
    head = part.head(PROBE_BYTES)
    if image_format(head) != "png":
        raise InvalidRequest(f"Invalid mask file '{part.filename}': the mask must be a PNG.", param="mask")
    if request.family == "dall-e-2" and part.size >= DALLE2_MAX_BYTES:
        raise InvalidRequest(f"Invalid mask file '{part.filename}': dall-e-2 needs a mask under 4 MB.",
                             param="mask")
    mask_size = image_size(head)
    if image_size_ is not None and mask_size is not None and mask_size != image_size_:
        raise InvalidRequest(f"Invalid mask file '{part.filename}': the mask is {mask_size[0]}x{mask_size[1]}, "
                             f"the first image {image_size_[0]}x{image_size_[1]}; they must be the same size.",
                             param="mask")
