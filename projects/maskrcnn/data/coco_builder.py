"""TFDS builder for any COCO-format instance-segmentation dataset (COCO 2017, shapes, ...).

`build_coco_format_dataset` prepares (once) and returns a dataset readable with
`builder.as_dataset(split=...)`; `load_coco_format_dataset` reopens a prepared one without the
annotation files. Everything runs offline: images and annotations are local files.

Features of one example (one image):
  image           uint8 [h, w, 3]   the file's encoded bytes, decoded on read
  image/id        int64             COCO image id
  image/filename  text              `file_name` from the JSON
  image/orig_size int32 [2]         (height, width) from the JSON
  objects         Sequence of N instances, sorted by annotation id:
    bbox          float32 [N, 4]    xyxy in pixels (from the JSON `bbox`)
    label         int64 [N]         contiguous 0..K-1 in sorted-category-id order
    category_id   int64 [N]         the JSON's category id
    is_crowd      bool [N]
    area          float32 [N]       the JSON's `area`
    id            int64 [N]         annotation id
    mask          uint8 [N, h, w, 1] full-image binary mask (values 0/1), stored as PNG

Examples are written in image-id order (shuffling at write time is disabled); images without
annotations are kept. Category ids and names are stored in the dataset's metadata
(`metadata.json`) and the label names in its `ClassLabel`; `category_metadata` reads them back.
"""

import dataclasses
import io
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils


@dataclasses.dataclass(frozen=True)
class CocoAnnotations:
    """The parts of a COCO instances JSON the builder uses, in deterministic order.

    Attributes:
        categories: [{'id': int, 'name': str}, ...] sorted by id.
        images: image entries of the JSON sorted by id.
        annotations: image id -> that image's annotation entries sorted by id (images
            without annotations are absent).
    """
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]


def read_coco_annotations(json_path: str) -> CocoAnnotations:
    """Reads a COCO instances JSON file.

    Args:
        json_path: path of the JSON file.

    Returns:
        The categories, images and per-image annotations, sorted by id.

    Raises:
        ValueError: on duplicate category ids or an annotation of an unknown image or
            category.
    """
    with tf.io.gfile.GFile(json_path, 'r') as f:
        coco = json.load(f)
    categories = sorted(({'id': int(c['id']), 'name': str(c['name'])}
                         for c in coco['categories']), key=lambda c: c['id'])
    category_ids = [c['id'] for c in categories]
    known_ids = set(category_ids)
    if len(known_ids) != len(category_ids):
        raise ValueError(f'{json_path}: duplicate category ids in {category_ids}.')
    images = sorted(coco['images'], key=lambda im: im['id'])
    image_ids = {im['id'] for im in images}
    annotations = {}
    for ann in coco.get('annotations', []):
        if ann['image_id'] not in image_ids:
            raise ValueError(f'{json_path}: annotation {ann["id"]} refers to unknown '
                             f'image {ann["image_id"]}.')
        if ann['category_id'] not in known_ids:
            raise ValueError(f'{json_path}: annotation {ann["id"]} has unknown category '
                             f'{ann["category_id"]}; known: {category_ids}.')
        annotations.setdefault(ann['image_id'], []).append(ann)
    for anns in annotations.values():
        anns.sort(key=lambda a: a['id'])
    return CocoAnnotations(categories, images, annotations)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decodes a COCO segmentation (polygons, uncompressed or compressed RLE).

    Args:
        segmentation: list of polygons [[x0, y0, x1, y1, ...], ...], or an RLE dict
            {'size': [h, w], 'counts': list of ints (uncompressed) or str/bytes}.
        height: image height.
        width: image width.

    Returns:
        uint8 [height, width] binary mask (0/1).
    """
    if isinstance(segmentation, list):
        # pycocotools needs at least 3 points per polygon; COCO has a few shorter ones.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get('counts'), list):
        rle = mask_utils.frPyObjects(segmentation, *segmentation['size'])
    else:
        counts = segmentation['counts']
        rle = {'size': list(segmentation['size']),
               'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f'Segmentation of size {mask.shape} in an image of size '
                         f'{(height, width)}.')
    return mask


def _encode_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode='L').save(buffer, format='png', compress_level=1)
    return buffer.getvalue()


def coco_example(image_info: dict[str, Any], annotations: list[dict[str, Any]],
                 image_dir: str, label_of: dict[int, int]) -> dict[str, Any]:
    """The feature dict of one image (see the module docstring).

    Args:
        image_info: the image's JSON entry (`id`, `file_name`, `height`, `width`).
        annotations: the image's annotation entries.
        image_dir: folder that `file_name` is relative to.
        label_of: category id -> contiguous label 0..K-1.

    Returns:
        A dict accepted by the builder's features.
    """
    height, width = int(image_info['height']), int(image_info['width'])
    path = os.path.join(image_dir, image_info['file_name'])
    with tf.io.gfile.GFile(path, 'rb') as f:
        image_bytes = f.read()
    boxes_xywh = np.array([a['bbox'] for a in annotations], np.float32).reshape(-1, 4)
    masks = [_encode_png(decode_segmentation(a.get('segmentation', []), height, width))
             for a in annotations]
    return {
        'image': image_bytes,
        'image/id': int(image_info['id']),
        'image/filename': image_info['file_name'],
        'image/orig_size': np.array([height, width], np.int32),
        'objects': {
            'bbox': np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]],
                                   axis=1),
            'label': np.array([label_of[a['category_id']] for a in annotations], np.int64),
            'category_id': np.array([a['category_id'] for a in annotations], np.int64),
            'is_crowd': np.array([bool(a.get('iscrowd', 0)) for a in annotations], bool),
            'area': np.array([a.get('area', 0.0) for a in annotations], np.float32),
            'id': np.array([a['id'] for a in annotations], np.int64),
            'mask': masks,
        },
    }


class _CocoFormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-name builders made by `_builder_class`."""

    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, splits: dict[str, tuple[str, str]], **kwargs):
        if not splits:
            raise ValueError('At least one split is needed.')
        self._splits = dict(splits)
        self._coco_cache = {}
        super().__init__(**kwargs)

    def _read(self, split: str) -> CocoAnnotations:
        json_path = self._splits[split][0]
        if json_path not in self._coco_cache:
            self._coco_cache[json_path] = read_coco_annotations(json_path)
        return self._coco_cache[json_path]

    def _categories(self) -> list[dict[str, Any]]:
        return self._read(next(iter(self._splits))).categories

    def _info(self) -> tfds.core.DatasetInfo:
        categories = self._categories()
        instance = {
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
            'label': tfds.features.ClassLabel(names=[c['name'] for c in categories]),
            'category_id': np.int64,
            'is_crowd': np.bool_,
            'area': np.float32,
            'id': np.int64,
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

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        coco = self._read(split)
        if coco.categories != self._categories():
            raise ValueError(f'Split {split!r} has categories {coco.categories}, expected '
                             f'{self._categories()} (as in the first split).')
        label_of = {c['id']: i for i, c in enumerate(coco.categories)}
        image_dir = self._splits[split][1]
        for image_info in coco.images:
            anns = coco.annotations.get(image_info['id'], [])
            yield image_info['id'], coco_example(image_info, anns, image_dir, label_of)


def _builder_class(name: str, version: str) -> type[_CocoFormatBuilder]:
    """A builder class whose TFDS name is `name` (not added to the TFDS registry)."""
    dataset_name, dataset_version = name, version

    class CocoFormatBuilder(_CocoFormatBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(dataset_version)

    return CocoFormatBuilder


def _builder_dir(name: str, data_dir: str, version: str) -> str:
    return os.path.join(os.path.expanduser(data_dir), name, version)


def build_coco_format_dataset(name: str, splits: dict[str, tuple[str, str]], data_dir: str,
                              version: str = '1.0.0') -> tfds.core.DatasetBuilder:
    """Prepares the dataset unless `data_dir/name/version` already holds it; returns it.

    Args:
        name: TFDS dataset name (snake_case), e.g. 'coco2017' or 'shapes_n2000...'.
        splits: split name -> (annotation JSON path, image folder), e.g.
            {'train': ('.../instances_train2017.json', '.../train2017')}. All splits must
            have the same categories.
        data_dir: TFDS data directory.
        version: dataset version 'x.y.z'.

    Returns:
        A builder reading the prepared dataset (`as_dataset(split=...)`).
    """
    builder_dir = _builder_dir(name, data_dir, version)
    if not tf.io.gfile.exists(os.path.join(builder_dir, 'dataset_info.json')):
        builder = _builder_class(name, version)(
            splits=splits, data_dir=os.path.expanduser(data_dir))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return tfds.builder_from_directory(builder_dir)


def load_coco_format_dataset(name: str, data_dir: str,
                             version: str = '1.0.0') -> tfds.core.DatasetBuilder:
    """Opens a dataset prepared by `build_coco_format_dataset` (no annotation files needed)."""
    builder_dir = _builder_dir(name, data_dir, version)
    if not tf.io.gfile.exists(os.path.join(builder_dir, 'dataset_info.json')):
        raise FileNotFoundError(f'No prepared dataset {name!r} version {version} in '
                                f'{data_dir} (looked for {builder_dir}).')
    return tfds.builder_from_directory(builder_dir)


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
