"""Reading COCO instances JSON files: categories, images and per-image annotations.

Structural faults (not a COCO file, duplicate ids, entries without an integer id) are errors;
annotations that name an unknown image or category are counted in the split's build report
(validation.py) and left out.
"""

import dataclasses
import json
from typing import Any, Optional

from projects.maskrcnn.data import files
from projects.maskrcnn.data import validation

BACKGROUND_NAMES = frozenset({'_background_', '__background__', 'background'})


@dataclasses.dataclass
class CocoAnnotations:
    """The parts of a COCO instances JSON the builder uses, in deterministic order.

    Attributes:
        raw: the whole JSON.
        categories: [{'id': int, 'name': str}, ...] sorted by id.
        images: image entries of the JSON sorted by id.
        annotations: image id -> that image's annotations sorted by id, only those whose
            image and category exist (images without annotations are absent).
        report: the split's report, holding the JSON-level problems so far.
    """
    raw: dict[str, Any]
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    report: validation.SplitReport


def _require_ids(entries: list[Any], what: str, json_path: str) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get('id'), int):
            raise ValueError(f'{json_path}: {what} #{i} has no integer "id": {entry!r:.200}')


def read_coco_annotations(json_path: str, split: str = '',
                          coco: Optional[dict[str, Any]] = None) -> CocoAnnotations:
    """Reads a COCO instances JSON file (a path or 'archive.zip/member').

    Args:
        json_path: the file.
        split: split name, for the report.
        coco: the file's parsed contents, if already read.

    Raises:
        ValueError: when the JSON's structure is unusable (not COCO, duplicate category or
            image ids, entries without an integer id). Annotations of unknown images or
            categories are not errors: they are counted in the report and left out.
    """
    if coco is None:
        coco = json.loads(files.read_bytes(json_path))
    if not isinstance(coco, dict) or 'images' not in coco or 'categories' not in coco:
        raise ValueError(f'{json_path}: not a COCO instances JSON (needs "images" and '
                         f'"categories").')
    annotations = coco.get('annotations') or []
    for what, entries in (('category', coco['categories']), ('image', coco['images']),
                          ('annotation', annotations)):
        _require_ids(entries, what, json_path)
    categories = sorted(({'id': c['id'], 'name': str(c.get('name', c['id']))}
                         for c in coco['categories']), key=lambda c: c['id'])
    for what, ids in (('category', [c['id'] for c in categories]),
                      ('image', [im['id'] for im in coco['images']])):
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f'{json_path}: duplicate {what} ids {duplicates}.')
    images = sorted(coco['images'], key=lambda im: im['id'])
    image_ids, category_ids = {im['id'] for im in images}, {c['id'] for c in categories}
    report = validation.SplitReport(split, images_in=len(images),
                                    annotations_in=len(annotations))
    per_image = {}
    for ann in annotations:
        if ann.get('image_id') not in image_ids:
            report.add('unknown_image', ann['id'])
        elif ann.get('category_id') not in category_ids:
            report.add('unknown_category', ann['id'])
        else:
            per_image.setdefault(ann['image_id'], []).append(ann)
    for anns in per_image.values():
        anns.sort(key=lambda a: a['id'])
    return CocoAnnotations(coco, categories, images, per_image, report)


def label_categories(categories: list[dict[str, Any]],
                     used_ids: set[int]) -> list[dict[str, Any]]:
    """The categories that get a label: all but unused background-named ones.

    Names shared by several categories get their id appended ('car (7)'), as labels need
    unique names.
    """
    kept = [c for c in categories
            if c['id'] in used_ids or c['name'].lower() not in BACKGROUND_NAMES]
    names = [c['name'] for c in kept]
    return [c if names.count(c['name']) == 1 else {**c, 'name': f"{c['name']} ({c['id']})"}
            for c in kept]
