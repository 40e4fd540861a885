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
import io
import math
from typing import Any, Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

DROPPED = 'annotation dropped'
SKIPPED = 'image skipped'
FIXED = 'kept, fixed'
KEPT = 'kept'

# kind -> (action, meaning). Annotation kinds list annotation ids, image kinds image ids.
KINDS = {
    'unknown_image': (DROPPED, 'image_id is not in `images`'),
    'unknown_category': (DROPPED, 'category_id is not in `categories`'),
    'bad_box': (DROPPED, 'bbox missing or not 4 finite numbers'),
    'empty_box': (DROPPED, 'box with zero or negative width or height'),
    'box_outside_image': (DROPPED, 'box does not overlap the image'),
    'degenerate_polygon': (DROPPED, 'every polygon has fewer than 3 points'),
    'bad_segmentation': (DROPPED, 'RLE of another size than the image, or malformed'),
    'on_skipped_image': (DROPPED, 'annotation of a skipped image'),
    'missing_image': (SKIPPED, 'file not found'),
    'unreadable_image': (SKIPPED, 'not a decodable image'),
    'truncated_image': (SKIPPED, 'file ends before the image does'),
    'image_size_mismatch': (SKIPPED, 'height/width in the JSON differ from the file'),
    'box_clipped': (FIXED, 'box reaches more than 1 pixel outside the image: clipped'),
    'polygon_part_dropped': (FIXED, 'polygons with fewer than 3 points removed'),
    'image_size_from_file': (FIXED, 'height/width missing in the JSON: read from the file'),
    'reencoded_image': (FIXED, 'format TensorFlow cannot decode: stored as PNG'),
    'no_segmentation': (KEPT, 'no segmentation: box only (has_mask False)'),
    'empty_mask': (KEPT, 'segmentation covers no pixel: box only (has_mask False)'),
    'crowd': (KEPT, 'crowd region: ignored in training, counted in evaluation'),
    'image_without_annotations': (KEPT, 'image with no (valid) annotation'),
}
MAX_EXAMPLES = 5
BOX_TOLERANCE = 1.0  # pixels a box may reach outside the image before it counts as clipped
# Formats `tf.io.decode_image` reads (PIL's names; MPO is a multi-picture JPEG).
TF_FORMATS = frozenset({'JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'WEBP'})


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
        return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """A usable image: its bytes (re-encoded if TF cannot decode the original) and size."""
    data: bytes
    height: int
    width: int
    reencoded: bool


def check_image(data: bytes, path: str, json_size: Optional[tuple[int, int]]
                ) -> CheckedImage:
    """Decodes an image fully to prove it is usable.

    Args:
        data: the file's bytes.
        path: the file's path, for messages.
        json_size: (height, width) from the JSON, or None when the JSON has none.

    Returns:
        The image to store.

    Raises:
        BadImageError: unreadable, truncated, or of another size than the JSON says.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes everything: a truncated file fails here
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
        kind = 'truncated_image' if 'truncated' in str(e).lower() else 'unreadable_image'
        raise BadImageError(kind, path, str(e)) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises the first two for some corrupt headers, the last above 179M pixels.
        raise BadImageError('unreadable_image', path, str(e)) from None
    width, height = image.size
    if json_size is not None and tuple(json_size) != (height, width):
        hint = ''
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation swaps axes
            hint = ' (EXIF orientation rotates it: TensorFlow ignores EXIF)'
        raise BadImageError('image_size_mismatch', path,
                            f'the JSON says {tuple(json_size)} (height, width), the file is '
                            f'{(height, width)}{hint}')
    reencoded = image.format not in TF_FORMATS
    if reencoded:
        buffer = io.BytesIO()
        image.convert('RGB').save(buffer, format='png')
        data = buffer.getvalue()
    return CheckedImage(data, height, width, reencoded)


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
    mask: Optional[np.ndarray]  # uint8 [height, width] 0/1
    repairs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _finite_numbers(values: Any) -> bool:
    return (isinstance(values, (list, tuple)) and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values))


def _check_box(ann: dict[str, Any], height: int, width: int, report: SplitReport,
               repairs: dict[str, Any]) -> Optional[np.ndarray]:
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
                     report: SplitReport, repairs: dict[str, Any]) -> Optional[np.ndarray]:
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


def _decode_rle(rle: dict[str, Any], height: int, width: int) -> Optional[np.ndarray]:
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
                        repairs: dict[str, Any]) -> tuple[bool, Optional[np.ndarray]]:
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


def check_annotation(ann: dict[str, Any], height: int, width: int,
                     report: SplitReport) -> Optional[Instance]:
    """The annotation as an `Instance`, or None (counted in `report`) if it is dropped.

    Args:
        ann: an annotation of the JSON whose image and category are known.
        height: the image's height.
        width: the image's width.
        report: where problems are counted.
    """
    repairs = {}
    box = _check_box(ann, height, width, report, repairs)
    if box is None:
        return None
    usable, mask = decode_segmentation(ann, height, width, report, repairs)
    if not usable:
        return None
    is_crowd = bool(ann.get('iscrowd', 0))
    if is_crowd:
        report.add('crowd', ann['id'])
    area = ann.get('area')
    if not isinstance(area, (int, float)) or not math.isfinite(area):
        area = float(mask.sum()) if mask is not None else float((box[2] - box[0]) *
                                                                 (box[3] - box[1]))
        repairs['area'] = area  # COCOeval needs it
    return Instance(int(ann['id']), int(ann['category_id']), box, is_crowd, float(area), mask,
                    repairs)
