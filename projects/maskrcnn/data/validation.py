"""Checks of COCO-format data while it is built, and the build report.

Real exports contain broken items; the builder neither crashes on them hours into a run nor
drops them without a word. Every problem has a kind (`KINDS`) whose action is one of:
  annotation dropped  the annotation is not stored
  image skipped       the image (and its annotations) is not stored; without
                      `skip_bad_images` this is an error that names the file instead
  kept, fixed         stored after a repair (clipped box, polygon parts removed, ...)
  kept                stored as is; counted for information (crowd, boxes only, ...)

`SplitReport` counts the kinds with the first few ids of each and checks that the input adds
up: images_in = images_kept + skipped images, and annotations_in = annotations_kept +
dropped annotations.
"""

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from projects.maskrcnn.data import image_io

DROPPED = 'annotation dropped'
SKIPPED = 'image skipped'
FIXED = 'kept, fixed'
KEPT = 'kept'

# kind -> (action, meaning). Annotation kinds list annotation ids, image kinds image ids.
KINDS = {
    'unknown_image': (DROPPED, 'image_id is not in `images`'),
    'unknown_category': (DROPPED, 'category_id is not in `categories`'),
    'duplicate_annotation': (DROPPED, 'an annotation listed twice (same id and fields, or '
                                      'same fields on a merged duplicate image)'),
    'bad_iscrowd': (DROPPED, 'iscrowd is not 0, 1, true or false'),
    'bad_box': (DROPPED, 'bbox missing or not 4 finite numbers'),
    'empty_box': (DROPPED, 'box with zero or negative width or height'),
    'box_outside_image': (DROPPED, 'box does not overlap the image'),
    'degenerate_polygon': (DROPPED, 'every polygon has fewer than 3 points'),
    'bad_segmentation': (DROPPED, 'RLE of another size than the image, or malformed'),
    'on_skipped_image': (DROPPED, 'annotation of a skipped image'),
    'duplicate_file': (SKIPPED, 'file_name of an image listed under a lower id: merged into '
                                'it (its annotations moved there)'),
    'missing_image': (SKIPPED, 'file not found'),
    'unreadable_image': (SKIPPED, 'not a decodable image'),
    'truncated_image': (SKIPPED, 'file ends before the image does'),
    'image_size_mismatch': (SKIPPED, 'height/width in the JSON differ from the file'),
    'annotation_moved': (FIXED, 'annotation of a duplicate_file image: image_id set to the '
                                'first image of that file'),
    'box_clipped': (FIXED, 'box reaches more than 1 pixel outside the image: clipped'),
    'polygon_part_dropped': (FIXED, 'polygons with fewer than 3 points removed'),
    'image_size_from_file': (FIXED, 'height/width missing in the JSON: read from the file'),
    'reencoded_image': (FIXED, '16-bit, alpha, CMYK or a format TensorFlow reads otherwise: '
                               'decoded by image_io.py and stored as PNG'),
    'exif_orientation': (FIXED, 'EXIF orientation tag not 1: stored upright (image_io.py)'),
    'no_segmentation': (KEPT, 'no segmentation: box only (has_mask False)'),
    'empty_mask': (KEPT, 'segmentation covers no pixel: box only (has_mask False)'),
    'box_mask_mismatch': (KEPT, "box and the mask's extent disagree (IoU < 0.5): the mask "
                                'is cropped to the box in training'),
    'crowd': (KEPT, 'crowd region: ignored in training, counted in evaluation'),
    'image_without_annotations': (KEPT, 'image with no (valid) annotation'),
}
MAX_EXAMPLES = 5
MISMATCH_IOU = 0.5  # box vs. mask extent below this counts as box_mask_mismatch
BOX_TOLERANCE = 1.0  # pixels a box may reach outside the image before it counts as clipped


class BadImageError(ValueError):
    """An image that cannot be used; `kind` is one of the 'image skipped' KINDS."""

    def __init__(self, kind: str, path: str, detail: str):
        self.kind = kind
        super().__init__(f'{kind}: {path}: {detail}. Fix or remove the file, or build with '
                         f'--skip_bad_images (dataset_configs.skip_bad_images) to skip it.')


@dataclasses.dataclass
class SplitReport:
    """Counts of one split's input, output and problems (see the module docstring)."""
    split: str
    images_in: int = 0
    annotations_in: int = 0
    images_kept: int = 0
    annotations_kept: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    # Non-crowd instances of a kept image (those training can use) -> number of images.
    instances_per_image: dict[int, int] = dataclasses.field(default_factory=dict)

    def add_instances(self, count: int) -> None:
        """Counts a kept image with `count` non-crowd instances."""
        self.instances_per_image[count] = self.instances_per_image.get(count, 0) + 1

    def beyond(self, max_instances: int) -> tuple[int, int]:
        """(images with more than `max_instances` non-crowd instances, instances beyond it)."""
        over = {n: k for n, k in self.instances_per_image.items() if n > max_instances}
        return sum(over.values()), sum((n - max_instances) * k for n, k in over.items())

    def add(self, kind: str, item_id: Any) -> None:
        if kind not in KINDS:
            raise KeyError(f'Unknown problem kind {kind!r}.')
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(item_id)

    def total(self, action: str) -> int:
        return sum(n for kind, n in self.counts.items() if KINDS[kind][0] == action)

    def check_totals(self) -> None:
        """Raises RuntimeError unless every input image and annotation is accounted for."""
        images = self.images_kept + self.total(SKIPPED)
        annotations = self.annotations_kept + self.total(DROPPED)
        if (images, annotations) != (self.images_in, self.annotations_in):
            raise RuntimeError(
                f'Split {self.split!r}: kept + skipped images = {images} and kept + dropped '
                f'annotations = {annotations}, but the input has {self.images_in} images and '
                f'{self.annotations_in} annotations: {self.counts}.')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'SplitReport':
        d = dict(d)
        d['instances_per_image'] = {int(n): k for n, k in
                                    d.get('instances_per_image', {}).items()}
        return cls(**d)

    def format(self) -> str:
        lines = [f"split '{self.split}': {self.images_kept} of {self.images_in} images and "
                 f'{self.annotations_kept} of {self.annotations_in} annotations kept']
        for action in (SKIPPED, DROPPED, FIXED, KEPT):
            kinds = [k for k in KINDS if k in self.counts and KINDS[k][0] == action]
            for kind in kinds:
                ids = ', '.join(str(i) for i in self.examples[kind])
                more = ', ...' if self.counts[kind] > len(self.examples[kind]) else ''
                lines.append(f'  {action:18s} {self.counts[kind]:7d}  {kind} '
                             f'({KINDS[kind][1]}); ids: {ids}{more}')
        if len(lines) == 1:
            lines.append('  no problems')
        if self.instances_per_image:
            lines.append(f'  at most {max(self.instances_per_image)} non-crowd instances in '
                         'one image (dataset_configs.max_instances keeps the first ones)')
        return '\n'.join(lines)


def check_image(data: bytes, path: str, json_size: tuple[int, int] | None
                ) -> image_io.StoredImage:
    """Decodes an image fully (by image_io's rules) to prove it is usable.

    Args:
        data: the file's bytes.
        path: the file's path, for messages.
        json_size: (height, width) from the JSON, or None when the JSON has none.

    Returns:
        The image to store (upright: EXIF orientation applied).

    Raises:
        BadImageError: unreadable, truncated, or of another size than the JSON says.
    """
    try:
        image = image_io.stored_image(data)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
        kind = 'truncated_image' if 'truncated' in str(e).lower() else 'unreadable_image'
        raise BadImageError(kind, path, str(e)) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises the first two for some corrupt headers, the last above 179M pixels.
        raise BadImageError('unreadable_image', path, str(e)) from None
    if json_size is not None and tuple(json_size) != (image.height, image.width):
        hint = ''
        if image.orientation in image_io.SWAPS_AXES and tuple(json_size) == image.stored_size:
            hint = (f'; the JSON has the size before the EXIF orientation {image.orientation}, '
                    'so the annotations were drawn on the unrotated pixels, but images are '
                    'read upright (EXIF applied, as annotation tools and Detectron2 do): '
                    're-export them from a tool that applies EXIF, or remove the tag '
                    '(exiftool -Orientation=1 -n FILE)')
        raise BadImageError('image_size_mismatch', path,
                            f'the JSON says {tuple(json_size)} (height, width), the file '
                            f'read upright is {(image.height, image.width)}{hint}')
    return image


@dataclasses.dataclass(frozen=True)
class Instance:
    """A checked annotation: box xyxy clipped to the image, mask None for box-only ones.

    `repairs` holds the JSON fields that were fixed ('bbox' when clipped, 'segmentation'
    when polygon parts were removed), in the JSON's own format.
    """
    id: int
    category_id: int
    box_xyxy: np.ndarray
    is_crowd: bool
    area: float
    mask: np.ndarray | None  # uint8 [height, width] 0/1
    repairs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _finite_numbers(values: Any) -> bool:
    return (isinstance(values, (list, tuple)) and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values))


def _check_box(ann: dict[str, Any], height: int, width: int, report: SplitReport,
               repairs: dict[str, Any]) -> np.ndarray | None:
    """Clipped xyxy box, or None (counted) when the box is unusable."""
    bbox = ann.get('bbox')
    if not _finite_numbers(bbox) or len(bbox) != 4:
        report.add('bad_box', ann['id'])
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        report.add('empty_box', ann['id'])
        return None
    box = np.array([x, y, x + w, y + h])
    clipped = np.clip(box, 0.0, [width, height, width, height])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.add('box_outside_image', ann['id'])
        return None
    if np.abs(clipped - box).max() > BOX_TOLERANCE:
        report.add('box_clipped', ann['id'])
        repairs['bbox'] = [float(v) for v in np.concatenate([clipped[:2],
                                                              clipped[2:] - clipped[:2]])]
    return clipped.astype(np.float32)


def _decode_polygons(ann: dict[str, Any], polygons: list[Any], height: int, width: int,
                     report: SplitReport, repairs: dict[str, Any]) -> np.ndarray | None:
    if polygons and not isinstance(polygons[0], (list, tuple)):
        polygons = [polygons]  # a single polygon written without the outer list
        repairs['segmentation'] = polygons
    good = [p for p in polygons
            if _finite_numbers(p) and len(p) >= 6 and len(p) % 2 == 0]
    if not good:
        report.add('degenerate_polygon', ann['id'])
        return None
    if len(good) < len(polygons):
        report.add('polygon_part_dropped', ann['id'])
        repairs['segmentation'] = good
    return mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects([[float(v) for v in p] for p in good], height, width)))


def _decode_rle(rle: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """Binary mask of an RLE dict, or None when it is malformed or of another size."""
    size, counts = rle.get('size'), rle.get('counts')
    if not _finite_numbers(size) or [int(s) for s in size] != [height, width]:
        return None
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return None
        rle = mask_utils.frPyObjects({'size': [height, width], 'counts': counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        rle = {'size': [height, width],
               'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
    else:
        return None
    try:
        mask = mask_utils.decode(rle)
    except Exception:  # pylint: disable=broad-except  # pycocotools raises bare Exceptions
        return None
    return mask if mask.shape == (height, width) else None


def decode_segmentation(ann: dict[str, Any], height: int, width: int, report: SplitReport,
                        repairs: dict[str, Any]) -> tuple[bool, np.ndarray | None]:
    """(usable, mask): usable False drops the annotation; mask None means box only."""
    seg = ann.get('segmentation')
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        report.add('no_segmentation', ann['id'])
        return True, None
    if isinstance(seg, (list, tuple)):
        mask = _decode_polygons(ann, list(seg), height, width, report, repairs)
        if mask is None:
            return False, None
    elif isinstance(seg, dict):
        mask = _decode_rle(seg, height, width)
        if mask is None:
            report.add('bad_segmentation', ann['id'])
            return False, None
    else:
        report.add('bad_segmentation', ann['id'])
        return False, None
    if not mask.any():
        report.add('empty_mask', ann['id'])
        return True, None
    return True, mask


def _iscrowd(ann: dict[str, Any], report: SplitReport) -> bool | None:
    """The annotation's crowd flag, or None (counted) unless it is 0, 1, true or false."""
    value = ann.get('iscrowd', 0)
    # A string such as "false" would be truthy; pycocotools would read it as a crowd.
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    report.add('bad_iscrowd', ann['id'])
    return None


def _box_disagrees(box: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the mask's extent and the xyxy box overlap with IoU < MISMATCH_IOU and
    differ by more than rasterisation could explain (2 pixels on some side)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    extent = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
    inter = np.prod(np.maximum(np.minimum(box[2:], extent[2:]) -
                               np.maximum(box[:2], extent[:2]), 0.0))
    union = np.prod(box[2:] - box[:2]) + np.prod(extent[2:] - extent[:2]) - inter
    return inter / union < MISMATCH_IOU and np.abs(extent - box).max() > 2.0


def check_annotation(ann: dict[str, Any], height: int, width: int,
                     report: SplitReport) -> Instance | None:
    """The annotation as an `Instance`, or None (counted in `report`) if it is dropped.

    Args:
        ann: an annotation of the JSON whose image and category are known.
        height: the image's height.
        width: the image's width.
        report: where problems are counted.
    """
    repairs = {}
    is_crowd = _iscrowd(ann, report)
    if is_crowd is None:
        return None
    box = _check_box(ann, height, width, report, repairs)
    if box is None:
        return None
    usable, mask = decode_segmentation(ann, height, width, report, repairs)
    if not usable:
        return None
    if mask is not None and _box_disagrees(box, mask):
        report.add('box_mask_mismatch', ann['id'])
    if is_crowd:
        report.add('crowd', ann['id'])
    area = ann.get('area')
    if not isinstance(area, (int, float)) or not math.isfinite(area):
        area = float(mask.sum()) if mask is not None else float((box[2] - box[0]) *
                                                                 (box[3] - box[1]))
        repairs['area'] = area  # COCOeval needs it
    return Instance(int(ann['id']), int(ann['category_id']), box, is_crowd, float(area), mask,
                    repairs)
