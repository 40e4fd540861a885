"""COCO 2017 instance segmentation (train/val) with masks: the COCO-format builder on the
official files.

Put the official files in one folder (the manual dir), extracted or as the zips:
  train2017/ or train2017.zip              images
  val2017/   or val2017.zip
  annotations/instances_{train,val}2017.json or annotations_trainval2017.zip
then build (about 120k images; the zips are read in place, not extracted):
  python -m projects.maskrcnn.data.build_dataset --coco2017_dir=DIR [--data_dir=...]
With `--download` the missing zips are first downloaded into DIR from images.cocodataset.org
(about 19 GB). The 80 categories keep their COCO ids (1..90 with gaps); labels are 0..79 in
id order. The result lives in `data_dir/coco2017/<version>` and configs refer to it by name.
"""

import os
import urllib.request
from typing import Any

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from projects.maskrcnn.data import coco_builder
from projects.maskrcnn.data import coco_categories
from projects.maskrcnn.data import files

NAME = 'coco2017'
SPLITS = {'train': 'train2017', 'val': 'val2017'}
ANNOTATIONS_ZIP = 'annotations_trainval2017.zip'
URLS = {
    'train2017.zip': 'http://images.cocodataset.org/zips/train2017.zip',
    'val2017.zip': 'http://images.cocodataset.org/zips/val2017.zip',
    ANNOTATIONS_ZIP: 'http://images.cocodataset.org/annotations/annotations_trainval2017.zip',
}
# The 80 instance categories of COCO 2014/2017: (id, name).
CATEGORIES = coco_categories.CATEGORIES


def split_files(manual_dir: str) -> dict[str, tuple[str, str]]:
    """split -> (annotation JSON, image folder) in `manual_dir`, extracted files first.

    Raises:
        FileNotFoundError: naming every missing file and where it can be downloaded.
    """
    found_files, missing = {}, []
    for split, tag in SPLITS.items():
        json_options = [os.path.join(manual_dir, 'annotations', f'instances_{tag}.json'),
                        os.path.join(manual_dir, ANNOTATIONS_ZIP, 'annotations',
                                     f'instances_{tag}.json')]
        image_options = [os.path.join(manual_dir, tag),
                         os.path.join(manual_dir, f'{tag}.zip', tag)]
        found = [next((p for p in options if files.path_exists(p)), None)
                 for options in (json_options, image_options)]
        missing += [f'{options[0]} (or {options[1]})'
                    for options, path in zip((json_options, image_options), found) if not path]
        found_files[split] = tuple(found)
    if missing:
        raise FileNotFoundError(
            f'COCO 2017 files missing in {manual_dir}: {"; ".join(missing)}. Download '
            f'{", ".join(URLS.values())} into it (or build with --download).')
    return found_files


def download(manual_dir: str) -> None:
    """Downloads the official zips that `manual_dir` lacks (needs the internet)."""
    tf.io.gfile.makedirs(manual_dir)
    for filename, url in URLS.items():
        path = os.path.join(manual_dir, filename)
        tag = filename[:-len('.zip')]
        if files.path_exists(path) or tf.io.gfile.isdir(os.path.join(manual_dir, tag)):
            continue
        logging.info('Downloading %s to %s', url, path)
        partial = path + '.incomplete'
        with urllib.request.urlopen(url) as response, open(partial, 'wb') as f:
            total = int(response.headers.get('Content-Length', 0)) or None
            with tfds.core.utils.tqdm_utils.tqdm(total=total, unit='B', unit_scale=True,
                                                 desc=filename) as bar:
                while chunk := response.read(1 << 22):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(partial, path)


# pylint: disable-next=protected-access
class Coco2017(coco_builder._CocoFormatBuilder, skip_registration=True):
    """COCO 2017 instances with per-instance masks, from the manual dir (or downloaded)."""

    name = NAME
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, manual_dir: str | None = None, allow_download: bool = False,
                 **kwargs):
        self._coco_dir = manual_dir
        self._allow_download = allow_download
        super().__init__(splits=None, **kwargs)

    def _categories(self) -> list[dict[str, Any]]:
        categories = [{'id': i, 'name': n} for i, n in CATEGORIES]
        for split in self._splits or {}:
            in_json = self._read(split).categories
            if in_json != categories:
                raise ValueError(f'{self._splits[split][0]} is not COCO 2017: its categories '
                                 f'{in_json} differ from the official 80.')
        return categories

    def _split_files(self, dl_manager: tfds.download.DownloadManager
                     ) -> dict[str, tuple[str, str]]:
        manual_dir = self._coco_dir or os.fspath(dl_manager.manual_dir)
        if self._allow_download:
            download(manual_dir)
        return split_files(manual_dir)


def build_coco2017(data_dir: str, manual_dir: str | None = None,
                   allow_download: bool = False, skip_bad_images: bool = False
                   ) -> tfds.core.DatasetBuilder:
    """Prepares COCO 2017 in `data_dir/coco2017/<version>` unless it is there; returns it.

    Args:
        data_dir: TFDS data directory.
        manual_dir: the folder with the official files (default: TFDS's manual dir,
            `data_dir/downloads/manual`).
        allow_download: download the zips that `manual_dir` lacks.
        skip_bad_images: skip (and count) unusable images instead of raising.
    """
    data_dir = os.path.expanduser(data_dir)
    if coco_builder.VERSION in coco_builder.prepared_versions(NAME, data_dir):
        return coco_builder.load_coco_format_dataset(NAME, data_dir, coco_builder.VERSION)
    manual_dir = os.path.expanduser(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
    builder = Coco2017(manual_dir=manual_dir, allow_download=allow_download,
                       skip_bad_images=skip_bad_images, data_dir=data_dir)
    return coco_builder.prepare(builder)
