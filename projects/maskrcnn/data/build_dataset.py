"""Builds a COCO-format dataset (an annotation tool's export, COCO 2017, ...) into TFDS.

  python -m projects.maskrcnn.data.build_dataset --annotations=FILE --images=DIR --name=NAME \
      [--val_annotations=FILE --val_images=DIR] [--data_dir=DIR] [--skip_bad_images]
  python -m projects.maskrcnn.data.build_dataset --coco2017_dir=DIR [--download] [--data_dir=DIR]

`--annotations/--images` make the 'train' split, `--val_annotations/--val_images` the 'val'
split that training evaluates on (the same files may serve both). Either path may point into
a zip: `export.zip/annotations.json`. The dataset is written to `DATA_DIR/NAME/<version>`
with a build report (printed, and kept as build_report.json); a config then names it:
  config.dataset_name = 'coco_format'
  config.dataset_configs.name = NAME  (and data_dir, if not ~/tensorflow_datasets)
An unusable image stops the build with its file name unless --skip_bad_images is given.
"""

from collections.abc import Sequence

from absl import app
from absl import flags

from projects.maskrcnn.data import coco2017
from projects.maskrcnn.data import coco_builder

_ANNOTATIONS = flags.DEFINE_string('annotations', None, 'COCO JSON of the train split.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder that the train file_names are in.')
_VAL_ANNOTATIONS = flags.DEFINE_string('val_annotations', None, 'COCO JSON of the val split.')
_VAL_IMAGES = flags.DEFINE_string('val_images', None, 'Folder of the val images.')
_NAME = flags.DEFINE_string('name', None, 'Dataset name (letters, digits, underscores).')
_DATA_DIR = flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'TFDS data directory.')
_SKIP_BAD_IMAGES = flags.DEFINE_bool(
    'skip_bad_images', False, 'Skip (and count) missing or unreadable images instead of '
    'stopping.')
_COCO2017_DIR = flags.DEFINE_string(
    'coco2017_dir', None, 'Build COCO 2017 from this folder of official files (see '
    'projects/maskrcnn/data/coco2017.py) instead of --annotations/--images.')
_DOWNLOAD = flags.DEFINE_bool('download', False, 'With --coco2017_dir: download the '
                              'missing official zips into it first.')


def _splits() -> dict[str, tuple[str, str]]:
    pairs = {'train': (_ANNOTATIONS.value, _IMAGES.value),
             'val': (_VAL_ANNOTATIONS.value, _VAL_IMAGES.value)}
    for split, (json_path, image_dir) in pairs.items():
        if (json_path is None) != (image_dir is None):
            prefix = '' if split == 'train' else 'val_'
            raise app.UsageError(f'--{prefix}annotations and --{prefix}images go together.')
    splits = {s: p for s, p in pairs.items() if p[0] is not None}
    if 'train' not in splits:
        raise app.UsageError('Give --annotations and --images (or --coco2017_dir).')
    return splits


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    name = coco2017.NAME if _COCO2017_DIR.value else _NAME.value
    if name and coco_builder.VERSION in coco_builder.prepared_versions(name, _DATA_DIR.value):
        print(f'{name} {coco_builder.VERSION} is already prepared in {_DATA_DIR.value}: '
              'nothing is rebuilt (delete its folder to rebuild).')
    if _COCO2017_DIR.value:
        builder = coco2017.build_coco2017(_DATA_DIR.value, _COCO2017_DIR.value,
                                          allow_download=_DOWNLOAD.value,
                                          skip_bad_images=_SKIP_BAD_IMAGES.value)
    else:
        if not _NAME.value:
            raise app.UsageError('--name is required.')
        builder = coco_builder.build_coco_format_dataset(
            _NAME.value, _splits(), _DATA_DIR.value, skip_bad_images=_SKIP_BAD_IMAGES.value)
    reports = coco_builder.build_report(builder)
    print(f'Dataset {builder.name} {builder.version} in {builder.data_dir}')
    for split, info in builder.info.splits.items():
        print(f'  {split}: {info.num_examples} examples')
    ids, names = coco_builder.category_metadata(builder)
    print(f'{len(ids)} classes (model label: name (category id)): ' +
          ', '.join(f'{k}: {n} ({i})' for k, (i, n) in enumerate(zip(ids, names), 1)))
    print('Build report:\n' + '\n'.join(r.format() for r in reports.values()))


if __name__ == '__main__':
    app.run(main)
