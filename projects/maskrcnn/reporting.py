"""What a run reports so that runs can be compared: its config as TensorBoard
HParams, per-category AP at each evaluation (scalars, a text table and the
log) and `results.json` in the workdir, which `tools/compare.py` reads.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging
from clu import metric_writers
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

from projects.maskrcnn import evaluation

RESULTS_FILENAME = 'results.json'
# Shown by TensorBoard's HParams dashboard next to the evaluation's AP figures.
TRAIN_METRIC_TAGS = ('train/total_loss', 'train/images_per_sec')
VALIDATION_LOSS_TAG = 'valid/total_loss'

HParamValue = bool | int | float | str


# ----------------------------------------------------------------------------
# The config: flattened values, file name and command-line overrides
# ----------------------------------------------------------------------------

def _hparam_value(value: Any) -> HParamValue:
    """A value TensorBoard's HParams accept: sequences and None as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return str(value)


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, HParamValue]:
    """Every leaf of `config` as {'dotted.key': value}, in sorted key order."""
    flat = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, f'{prefix}{key}.')
            else:
                flat[f'{prefix}{key}'] = _hparam_value(value)

    visit(config.to_dict(), '')
    return dict(sorted(flat.items()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_source(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config file and command-line overrides given to the `--config`
    flag of main.py (ours or Scenic's). Where the trainer was called without
    that flag (a test, a notebook), the name is `config.experiment_name`.

    Returns:
      {'config_name': the file's name without .py, 'config_file': its path or
      None, 'overrides': {'dotted.key': value} from `--config.key=value`}.
    """
    flag = flags.FLAGS['config'] if 'config' in flags.FLAGS else None  # noqa: SIM401
    if flag is None or not flag.present:
        return {'config_name': str(config.get('experiment_name', '') or 'unnamed'),
                'config_file': None, 'overrides': {}}
    path = config_flags.get_config_filename(flag)  # TypeError if not a config flag
    overrides = config_flags.get_override_values(flag)
    name = os.path.splitext(os.path.basename(path.split(':')[0]))[0]
    return {'config_name': name, 'config_file': path,
            'overrides': {k: _jsonable(v) for k, v in sorted(overrides.items())}}


# ----------------------------------------------------------------------------
# TensorBoard HParams
# ----------------------------------------------------------------------------

def hparams_metric_tags(config: ml_collections.ConfigDict) -> list[str]:
    """The scalar tags the HParams dashboard shows next to the config values."""
    tags = [f'valid/{name}' for name in evaluation.metric_names(with_masks=True)]
    if config.get('compute_validation_loss', True):
        tags.append(VALIDATION_LOSS_TAG)
    return tags + list(TRAIN_METRIC_TAGS)


def write_hparams(writer: metric_writers.MetricWriter, hparams: Mapping[str, HParamValue],
                  metric_tags: Sequence[str]) -> None:
    """Writes the run's hparams (clu: TensorBoard's session-start record) and the
    experiment record naming the hparams and metrics, which clu does not write;
    without it TensorBoard would list every scalar of every run as a metric."""
    writer.write_hparams(dict(hparams))
    experiment = hparams_summary.hparams_config_pb(
        hparams=[hparams_summary.HParam(name) for name in hparams],
        metrics=[hparams_summary.Metric(tag) for tag in metric_tags])
    (value,) = experiment.value
    # The record carries its content in the metadata; the tensor is empty.
    writer.write_summaries(0, {value.tag: np.zeros((0,), np.float32)},
                           metadata={value.tag: value.metadata.SerializeToString()})


# ----------------------------------------------------------------------------
# Per-category AP
# ----------------------------------------------------------------------------

def per_category_metrics(per_category: Mapping[str, Mapping[int, float]],
                         meta: Mapping[str, Any]) -> dict[str, float]:
    """{'box_AP/<name>': AP, 'mask_AP/<name>': AP} of the dataset's categories
    that have ground truth (the others have no AP to plot).

    Args:
      per_category: `CocoEvaluator.per_category`, {'box': {category_id: AP}}.
      meta: the dataset's meta data (`category_ids`, `category_names`).
    """
    metrics = {}
    for prefix, by_id in per_category.items():
        for category_id, name in zip(meta['category_ids'], meta['category_names']):
            value = by_id.get(int(category_id), math.nan)
            if math.isfinite(value):
                metrics[f'{prefix}_AP/{name}'] = float(value)
    return metrics


def category_table(metrics: Mapping[str, float], names: Sequence[str]) -> str:
    """A Markdown table of box and mask AP per category, from the metrics of
    `per_category_metrics`, with the mean over the categories that have ground
    truth (COCO's overall AP) as the last row; '-' where a category has none."""
    prefixes = [p for p in ('box', 'mask') if f'{p}_AP' in metrics]
    rows = ['| category | ' + ' | '.join(f'{p} AP' for p in prefixes) + ' |',
            '|---' * (len(prefixes) + 1) + '|']
    for name in names:
        cells = [metrics.get(f'{p}_AP/{name}') for p in prefixes]
        rows.append(f'| {name} | ' + ' | '.join(
            '-' if v is None else f'{v:.1f}' for v in cells) + ' |')
    means = []
    for p in prefixes:
        values = [metrics[f'{p}_AP/{n}'] for n in names if f'{p}_AP/{n}' in metrics]
        means.append(f'{np.mean(values):.1f}' if values else '-')
    rows.append('| mean | ' + ' | '.join(means) + ' |')
    return '\n'.join(rows)


# ----------------------------------------------------------------------------
# The run's report
# ----------------------------------------------------------------------------

def write_json_atomically(path: str, data: Any) -> None:
    """Writes a temporary file next to `path`, then renames it: a reader never
    sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'  # same folder: the rename stays atomic
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(data, f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


class RunReport:
    """Writes the run's HParams once and, at each evaluation, the per-category
    table (TensorBoard text and the log) and `results.json` (process 0 only)."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict,
                 meta: Mapping[str, Any], writer: metric_writers.MetricWriter):
        self._path = os.path.join(workdir, RESULTS_FILENAME)
        self._names = [str(n) for n in meta['category_names']]
        self._writer = writer
        self._source = config_source(config)
        self._config = flatten_config(config)
        self._chief = jax.process_index() == 0
        self.train_images_per_sec: float | None = None
        if self._chief:
            # The workdir keeps two runs of equal configs apart: TensorBoard
            # merges runs whose hparams are all equal into one row.
            hparams = {'config': self._source['config_name'],
                       'workdir': os.path.abspath(workdir), **self._config}
            write_hparams(writer, hparams, hparams_metric_tags(config))

    def train_summary(self, summary: Mapping[str, float]) -> None:
        """Remembers the speed of the last logged training window."""
        self.train_images_per_sec = _finite_or_none(summary.get('images_per_sec'))

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Reports an evaluation's metrics (`trainer.evaluate`'s, with the
        per-category AP of `per_category_metrics`)."""
        table = category_table(metrics, self._names)
        logging.info('Per-category AP at step %d:\n%s', step, table)
        self._writer.write_texts(step, {'valid/per_category_AP': table})
        if self._chief:
            write_json_atomically(self._path, self.results(step, metrics))

    def results(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The content of results.json (NaN written as null)."""
        overall = {k: float(v) for k, v in metrics.items()
                   if '/' not in k and '_AP' in k}
        per_category = {name: {p: _finite_or_none(metrics.get(f'{p}_AP/{name}'))
                               for p in ('box', 'mask') if f'{p}_AP' in metrics}
                        for name in self._names}
        losses = {k: _finite_or_none(v) for k, v in metrics.items()
                  if k == 'total_loss' or k.startswith('loss_')}
        return {'step': int(step), **self._source, 'metrics': overall,
                'per_category_AP': per_category, 'validation_loss': losses or None,
                'train_images_per_sec': self.train_images_per_sec,
                'config': self._config}
