"""Reading COCO instances JSON files: categories, images and per-image annotations.

Structural faults (not a COCO file, unreadable JSON, no image, duplicate category or image
ids, two different annotations under one id, entries without an integer id) are errors naming
the file: pycocotools indexes annotations by id, so one of two would be evaluated twice and the
other lost (Detectron2's loader refuses them too). Repaired and counted in the split's build
report (validation.py): an annotation listed twice with the same contents (the copy is
dropped); an image file listed under several image ids (the entries are merged into the lowest
id, which gets all their annotations, less exact copies: stored once, no copy's objects count
as false positives on another); annotations that name an unknown image or category (left out).
"""

import dataclasses
import json
import os
from typing import Any

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


def parse_json(json_path: str) -> Any:
    """The parsed contents of a JSON file (or zip member); errors name the file."""
    data = files.read_bytes(json_path)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{json_path}: not readable as JSON ({len(data)} bytes; {e}); is '
                         f'the file truncated or of another format?') from None


def _content_key(ann: dict[str, Any]) -> str:
    """The annotation's fields but `id` and `image_id`, comparable across copies."""
    return json.dumps({k: v for k, v in ann.items() if k not in ('id', 'image_id')},
                      sort_keys=True, default=str)


def _unique_annotations(annotations: list[dict[str, Any]], json_path: str,
                        report: validation.SplitReport) -> list[dict[str, Any]]:
    """The annotations less exact copies (counted); raises on one id with two contents."""
    first, kept, conflicts = {}, [], []
    for ann in annotations:
        seen = first.get(ann['id'])
        if seen is None:
            first[ann['id']] = ann
            kept.append(ann)
        elif seen == ann:
            report.add('duplicate_annotation', ann['id'])
        elif ann['id'] not in conflicts:
            conflicts.append(ann['id'])
    if conflicts:
        raise ValueError(f'{json_path}: annotation ids {sorted(conflicts)[:5]} are each used by '
                         f'annotations with different contents ({len(conflicts)} ids); ids must '
                         f'be unique (pycocotools would evaluate one twice and lose the other): '
                         f'renumber the annotations.')
    return kept


def _merge_duplicate_files(images: list[dict[str, Any]], report: validation.SplitReport
                           ) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Images (sorted by id) less those repeating an earlier file_name, and id -> kept id."""
    by_file, kept, merged = {}, [], {}
    for image in images:
        name = os.path.normpath(str(image.get('file_name', '')))
        if name in by_file:
            merged[image['id']] = by_file[name]
            report.add('duplicate_file', image['id'])
        else:
            by_file[name] = image['id']
            kept.append(image)
    return kept, merged


def _per_image(annotations: list[dict[str, Any]], image_ids: set[int],
               category_ids: set[int], merged: dict[int, int],
               report: validation.SplitReport) -> dict[int, list[dict[str, Any]]]:
    """image id -> its annotations sorted by id; unknown references and copies counted."""
    per_image, contents = {}, set()

    def moved(ann):
        return isinstance(ann.get('image_id'), int) and ann['image_id'] in merged

    # Moved annotations last, so that the copy dropped is always the moved one.
    for ann in sorted(annotations, key=moved):
        if moved(ann):
            ann = {**ann, 'image_id': merged[ann['image_id']]}
            key = (ann['image_id'], _content_key(ann))
            if key in contents:  # the same object annotated on both copies of the file
                report.add('duplicate_annotation', ann['id'])
                continue
            report.add('annotation_moved', ann['id'])
        if not isinstance(ann.get('image_id'), int) or ann['image_id'] not in image_ids:
            report.add('unknown_image', ann['id'])
        elif ann.get('category_id') not in category_ids:
            report.add('unknown_category', ann['id'])
        else:
            contents.add((ann['image_id'], _content_key(ann)))
            per_image.setdefault(ann['image_id'], []).append(ann)
    for anns in per_image.values():
        anns.sort(key=lambda a: a['id'])
    return per_image


def read_coco_annotations(json_path: str, split: str = '',
                          coco: dict[str, Any] | None = None) -> CocoAnnotations:
    """Reads a COCO instances JSON file (a path or 'archive.zip/member').

    Args:
        json_path: the file.
        split: split name, for the report.
        coco: the file's parsed contents, if already read.

    Raises:
        ValueError: when the JSON is unusable (see the module docstring); the message
            names the file. Other problems are counted in the report.
    """
    if coco is None:
        coco = parse_json(json_path)
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
    if not coco['images']:
        raise ValueError(f'{json_path}: "images" is empty; a split needs at least one image.')
    report = validation.SplitReport(split, images_in=len(coco['images']),
                                    annotations_in=len(annotations))
    images, merged = _merge_duplicate_files(
        sorted(coco['images'], key=lambda im: im['id']), report)
    per_image = _per_image(_unique_annotations(annotations, json_path, report),
                           {im['id'] for im in images}, {c['id'] for c in categories},
                           merged, report)
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
