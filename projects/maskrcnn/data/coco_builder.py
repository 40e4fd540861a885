"""TFDS builder for any COCO-format instance-segmentation dataset (COCO 2017, shapes, ...).

`build_coco_format_dataset` prepares (once) and returns a dataset readable with
`builder.as_dataset(split=...)`; `load_coco_format_dataset` reopens a prepared one without the
annotation files. Everything runs offline: images and annotations are local files, or members
of zip archives named as `archive.zip/member/path` (COCO's official zips need no extraction).

Features of one example (one image):
  image           uint8 [h, w, 3]   upright (EXIF applied): the file's bytes, or a PNG of
                                    its pixels decoded by image_io.py (16-bit, alpha, ...)
  image/id        int64             COCO image id
  image/filename  text              `file_name` from the JSON
  image/orig_size int32 [2]         (height, width)
  objects         Sequence of N instances, sorted by annotation id:
    bbox          float32 [N, 4]    xyxy in pixels, clipped to the image
    label         int64 [N]         contiguous 0..K-1 in sorted-category-id order
    category_id   int64 [N]         the JSON's category id
    is_crowd      bool [N]
    area          float32 [N]       the JSON's `area`
    id            int64 [N]         annotation id
    has_mask      bool [N]          False for box-only annotations (no segmentation)
    mask          uint8 [N, h, w, 1] full-image binary mask (0/1; all 0 without has_mask), PNG

Any category ids are accepted (non-contiguous, 0 included); a category named like a background
(`coco_json.BACKGROUND_NAMES`, e.g. labelme's `_background_` with id 0) that no annotation of
any split uses is left out of the labels, as the exporter meant it; any other category is an
ordinary class. Annotations and images are checked (validation.py): broken items are dropped
or repaired and counted in a per-split report; a bad image is an error unless
`skip_bad_images`.

Besides the TFDS files the dataset folder holds `build_report.json` and, for every split but
'train', `annotations/<split>.json`: the input JSON less what was dropped and with what was
repaired (the same as the input when the report shows no problem), for the evaluator.
Examples are written in image-id order (write-time shuffling is disabled); images without
annotations are kept.
"""

import io
import json
import os
from typing import Any
from collections.abc import Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from projects.maskrcnn.data import coco_json
from projects.maskrcnn.data import files
from projects.maskrcnn.data import validation

# 2.0.0: has_mask, validation, build report, evaluation JSON. 2.1.0: images read by
# image_io.py (EXIF orientation applied, 16-bit, alpha, CMYK), duplicate files merged,
# instances per image in the report.
VERSION = '2.1.0'
REPORT_FILENAME = 'build_report.json'

def _encode_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode='L').save(buffer, format='png', compress_level=1)
    return buffer.getvalue()


def _json_size(image_info: dict[str, Any]) -> tuple[int, int] | None:
    size = (image_info.get('height'), image_info.get('width'))
    if all(isinstance(s, (int, float)) and s > 0 and s == int(s) for s in size):
        return int(size[0]), int(size[1])
    return None


def coco_example(image_info: dict[str, Any], annotations: list[dict[str, Any]],
                 image_dir: str, label_of: dict[int, int],
                 report: validation.SplitReport
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The feature dict of one image (see the module docstring) and its evaluation JSON.

    Args:
        image_info: the image's JSON entry (`id`, `file_name`, `height`, `width`).
        annotations: the image's annotations (known image and category).
        image_dir: folder (or 'archive.zip/folder') that `file_name` is relative to.
        label_of: category id -> contiguous label 0..K-1.
        report: where problems are counted.

    Returns:
        (example, kept): a dict accepted by the builder's features, and the kept annotations
        as they go into the evaluation JSON (repaired where the report says so).

    Raises:
        validation.BadImageError: the image is missing or unusable.
    """
    path = os.path.join(image_dir, image_info['file_name'])
    try:
        data = files.read_bytes(path)
    except FileNotFoundError:
        raise validation.BadImageError('missing_image', path, 'no such file') from None
    json_size = _json_size(image_info)
    image = validation.check_image(data, path, json_size)
    if json_size is None:
        report.add('image_size_from_file', image_info['id'])
    if image.orientation != 1:
        report.add('exif_orientation', image_info['id'])
    elif image.reencoded:
        report.add('reencoded_image', image_info['id'])
    height, width = image.height, image.width
    checked = [(ann, validation.check_annotation(ann, height, width, report))
               for ann in annotations]
    kept = [(ann, inst) for ann, inst in checked if inst is not None]
    instances = [inst for _, inst in kept]
    report.add_instances(sum(not i.is_crowd for i in instances))
    empty_png = _encode_png(np.zeros((height, width), np.uint8))
    example = {
        'image': image.data,
        'image/id': int(image_info['id']),
        'image/filename': image_info['file_name'],
        'image/orig_size': np.array([height, width], np.int32),
        'objects': {
            'bbox': np.array([i.box_xyxy for i in instances], np.float32).reshape(-1, 4),
            'label': np.array([label_of[i.category_id] for i in instances], np.int64),
            'category_id': np.array([i.category_id for i in instances], np.int64),
            'is_crowd': np.array([i.is_crowd for i in instances], bool),
            'area': np.array([i.area for i in instances], np.float32),
            'id': np.array([i.id for i in instances], np.int64),
            'has_mask': np.array([i.mask is not None for i in instances], bool),
            'mask': [empty_png if i.mask is None else _encode_png(i.mask) for i in instances],
        },
    }
    return example, [{**ann, **inst.repairs} for ann, inst in kept]


# ------------------------------------------------------------------------ the builder


class _CocoFormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-name builders made by `_builder_class` (and of COCO 2017's)."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, splits: dict[str, tuple[str, str]] | None,
                 skip_bad_images: bool = False, **kwargs):
        """`splits`: split -> (annotation JSON, image folder); None lets a subclass find
        them in `_split_files` (COCO 2017)."""
        if splits is not None and not splits:
            raise ValueError('At least one split is needed.')
        self._splits = dict(splits) if splits else None
        self._skip_bad_images = skip_bad_images
        self._json_cache, self._coco_cache = {}, {}
        self.reports: dict[str, validation.SplitReport] = {}
        self._eval_json: dict[str, dict[str, Any]] = {}
        super().__init__(**kwargs)

    def _read(self, split: str) -> coco_json.CocoAnnotations:
        """The split's annotations (a file serving several splits is parsed once)."""
        json_path = self._splits[split][0]
        if split not in self._coco_cache:
            if json_path not in self._json_cache:
                self._json_cache[json_path] = coco_json.parse_json(json_path)
            self._coco_cache[split] = coco_json.read_coco_annotations(
                json_path, split, self._json_cache[json_path])
        return self._coco_cache[split]

    def _categories(self) -> list[dict[str, Any]]:
        """The labelled categories, in label order (the same for every split)."""
        first, *others = self._splits
        categories = self._read(first).categories
        for split in others:
            if self._read(split).categories != categories:
                raise ValueError(f'Split {split!r} has categories '
                                 f'{self._read(split).categories}, expected {categories} '
                                 f'(as in split {first!r}).')
        used = {a['category_id'] for split in self._splits
                for anns in self._read(split).annotations.values() for a in anns}
        return coco_json.label_categories(categories, used)

    def _info(self) -> tfds.core.DatasetInfo:
        categories = self._categories()
        instance = {
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
            'label': tfds.features.ClassLabel(names=[c['name'] for c in categories]),
            'category_id': np.int64,
            'is_crowd': np.bool_,
            'area': np.float32,
            'id': np.int64,
            'has_mask': np.bool_,
            'mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description='COCO-format instance segmentation.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'image/id': np.int64,
                'image/filename': tfds.features.Text(),
                'image/orig_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
                'objects': tfds.features.Sequence(instance),
            }),
            metadata=tfds.core.MetadataDict(
                category_ids=[c['id'] for c in categories],
                category_names=[c['name'] for c in categories]),
            disable_shuffling=True,  # keep image-id order
        )

    def _split_files(self, dl_manager: tfds.download.DownloadManager
                     ) -> dict[str, tuple[str, str]]:
        del dl_manager  # everything is local
        return self._splits

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        self._splits = self._split_files(dl_manager)
        categories = self._categories()
        all_ids = {c['id'] for split in self._splits for c in self._read(split).categories}
        for left_out in sorted(all_ids - {c['id'] for c in categories}):
            logging.info('Category %d has a background name and no annotation: it gets no '
                         'label.', left_out)
        return {split: self._generate_examples(split, categories) for split in self._splits}

    def _generate_examples(self, split: str, categories: list[dict[str, Any]]
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        coco = self._read(split)
        report = coco.report
        label_of = {c['id']: i for i, c in enumerate(categories)}
        image_dir = self._splits[split][1]
        kept_images, kept_annotations = [], []
        for image_info in coco.images:
            anns = coco.annotations.get(image_info['id'], [])
            try:
                example, kept = coco_example(image_info, anns, image_dir, label_of, report)
            except validation.BadImageError as e:
                if not self._skip_bad_images:
                    raise
                logging.warning('Skipping image %s: %s', image_info['id'], e)
                report.add(e.kind, image_info['id'])
                for ann in anns:
                    report.add('on_skipped_image', ann['id'])
                continue
            report.images_kept += 1
            report.annotations_kept += len(kept)
            if not kept:
                report.add('image_without_annotations', image_info['id'])
            kept_images.append(image_info)
            kept_annotations.extend(kept)
            yield image_info['id'], example
        report.check_totals()
        if not report.images_kept:  # every image skipped: say why, not TFDS's assertion
            json_path = self._splits[split][0]
            raise ValueError(
                f'Split {split!r}: none of the {report.images_in} images of {json_path} could '
                f'be read from {image_dir}:\n{report.format()}\nCheck the images folder '
                f'(--images / dataset_configs.{split}_images): file_name is relative to it.')
        self.reports[split] = report
        logging.info('Build report of %s:\n%s', self.name, report.format())
        if split != 'train':
            self._eval_json[split] = {**coco.raw, 'images': kept_images,
                                      'annotations': kept_annotations}

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        # Written into the incomplete folder: they appear with the dataset or not at all.
        with tf.io.gfile.GFile(os.path.join(self.data_dir, REPORT_FILENAME), 'w') as f:
            json.dump({s: r.to_dict() for s, r in self.reports.items()}, f, indent=1)
        for split, coco in self._eval_json.items():
            tf.io.gfile.makedirs(os.path.join(self.data_dir, 'annotations'))
            with tf.io.gfile.GFile(os.path.join(self.data_dir, 'annotations',
                                                f'{split}.json'), 'w') as f:
                json.dump(coco, f)


def _builder_class(name: str, version: str) -> type[_CocoFormatBuilder]:
    """A builder class whose TFDS name is `name` (not added to the TFDS registry)."""
    dataset_name, dataset_version = name, version

    class CocoFormatBuilder(_CocoFormatBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(dataset_version)

    return CocoFormatBuilder


def _builder_dir(name: str, data_dir: str, version: str) -> str:
    return os.path.join(os.path.expanduser(data_dir), name, version)


def prepare(builder: _CocoFormatBuilder) -> tfds.core.DatasetBuilder:
    """Runs `builder` (logging its report) and returns a reader of the prepared files."""
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return tfds.builder_from_directory(builder.data_dir)


def build_coco_format_dataset(name: str, splits: dict[str, tuple[str, str]], data_dir: str,
                              version: str = VERSION, skip_bad_images: bool = False
                              ) -> tfds.core.DatasetBuilder:
    """Prepares the dataset unless `data_dir/name/version` already holds it; returns it.

    Args:
        name: TFDS dataset name (snake_case), e.g. 'my_export' or 'shapes_n2000...'.
        splits: split name -> (annotation JSON path, image folder), e.g.
            {'train': ('.../instances_train2017.json', '.../train2017')}; either may be
            inside a zip ('x.zip/annotations/a.json'). All splits must have the same
            categories.
        data_dir: TFDS data directory.
        version: dataset version 'x.y.z'.
        skip_bad_images: skip (and count) unusable images instead of raising.

    Returns:
        A builder reading the prepared dataset (`as_dataset(split=...)`).

    Raises:
        validation.BadImageError: an unusable image, without `skip_bad_images`.
    """
    builder_dir = _builder_dir(name, data_dir, version)
    if tf.io.gfile.exists(os.path.join(builder_dir, 'dataset_info.json')):
        return tfds.builder_from_directory(builder_dir)
    builder = _builder_class(name, version)(
        splits=splits, skip_bad_images=skip_bad_images, data_dir=os.path.expanduser(data_dir))
    return prepare(builder)


def prepared_versions(name: str, data_dir: str) -> list[str]:
    """Versions of `name` prepared in `data_dir`, oldest first."""
    root = os.path.join(os.path.expanduser(data_dir), name)
    if not tf.io.gfile.isdir(root):
        return []
    found = []
    for entry in tf.io.gfile.listdir(root):
        entry = entry.rstrip('/')
        if (tfds.core.Version.is_valid(entry) and
                tf.io.gfile.exists(os.path.join(root, entry, 'dataset_info.json'))):
            found.append(entry)
    return sorted(found, key=tfds.core.Version)


def load_coco_format_dataset(name: str, data_dir: str,
                             version: str | None = None) -> tfds.core.DatasetBuilder:
    """Opens a prepared dataset (no annotation files needed); the newest version if None."""
    versions = [version] if version else prepared_versions(name, data_dir)[-1:]
    if not versions or not tf.io.gfile.exists(
            os.path.join(_builder_dir(name, data_dir, versions[0]), 'dataset_info.json')):
        raise FileNotFoundError(
            f'No prepared dataset {name!r}{" version " + version if version else ""} in '
            f'{data_dir} (looked in {os.path.join(data_dir, name)}). Build it with `python '
            f'-m projects.maskrcnn.data.build_dataset --name={name} --data_dir={data_dir} '
            f'--annotations=... --images=...` (or --coco2017_dir=... for COCO 2017).')
    return tfds.builder_from_directory(_builder_dir(name, data_dir, versions[0]))


def category_metadata(builder: tfds.core.DatasetBuilder) -> tuple[list[int], list[str]]:
    """Category ids and names of a prepared dataset, in contiguous-label order.

    Returns:
        (ids, names): label i (0-based in the stored dataset) is category `ids[i]` named
        `names[i]`.
    """
    metadata = builder.info.metadata
    ids = [int(i) for i in metadata['category_ids']]
    names = list(builder.info.features['objects']['label'].names)
    if names != list(metadata['category_names']):
        raise ValueError(f'Label names {names} differ from the stored category names '
                         f'{metadata["category_names"]}.')
    return ids, names


def build_report(builder: tfds.core.DatasetBuilder) -> dict[str, validation.SplitReport]:
    """The per-split build reports of a prepared dataset ({} for datasets before 2.0.0)."""
    path = os.path.join(str(builder.data_dir), REPORT_FILENAME)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return {s: validation.SplitReport.from_dict(r) for s, r in json.load(f).items()}


def eval_annotations_file(builder: tfds.core.DatasetBuilder, split: str) -> str | None:
    """The evaluation JSON of `split` stored with the dataset, or None if there is none."""
    path = os.path.join(str(builder.data_dir), 'annotations', f'{split}.json')
    return path if tf.io.gfile.exists(path) else None
