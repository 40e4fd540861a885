"""Prints a Markdown table of several runs side by side, from their results.json.

  python -m projects.maskrcnn.tools.compare /tmp/runs/lr_0.02 /tmp/runs/lr_0.04

Columns: the run (its workdir), the config values that differ between the runs
given, box AP, mask AP, the step of the last evaluation and the training speed
(images/s of the last logged window). The trainer rewrites WORKDIR/results.json
at each evaluation (reporting.py), so a running job shows its latest figures.
Imports nothing of the project, so it starts at once.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

RESULTS_FILENAME = 'results.json'  # reporting.RESULTS_FILENAME
_UNSET = '(unset)'


def load_results(workdir: str) -> dict[str, Any]:
    """WORKDIR/results.json; a clear error naming the workdir when it is missing."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'{workdir}: no such directory')
    path = os.path.join(workdir, RESULTS_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f'{workdir} has no {RESULTS_FILENAME}: the run has not finished an evaluation '
            f'yet, or {workdir} is not a Detectax workdir')
    with open(path, encoding='utf-8') as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path} is not valid JSON: {e}') from e
    for key in ('step', 'metrics', 'config'):
        if key not in results:
            raise ValueError(f'{path} has no {key!r} entry')
    return results


def differing_values(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each run, {key: value} of the config values (and the config file's
    name) that are not the same in all `runs`."""
    configs = [{'config': r.get('config_name'), **r['config']} for r in runs]
    keys = sorted(set().union(*configs))
    differing = [k for k in keys if len({json.dumps(c.get(k, _UNSET)) for c in configs}) > 1]
    return [{k: c.get(k, _UNSET) for k in differing} for c in configs]


def _cell(text: str) -> str:
    return str(text).replace('|', '\\|')


def _number(value: Any, digits: int = 1) -> str:
    return '-' if value is None else f'{float(value):.{digits}f}'


def markdown_table(workdirs: Sequence[str], runs: Sequence[dict[str, Any]]) -> str:
    """The comparison table, one row per run, in the order given."""
    rows = ['| run | differing config values | box AP | mask AP | step | images/s |',
            '|---|---|---:|---:|---:|---:|']
    for workdir, run, diff in zip(workdirs, runs, differing_values(runs)):
        values = ', '.join(f'{k}={v}' for k, v in diff.items()) or '-'
        metrics = run['metrics']
        rows.append('| ' + ' | '.join([
            _cell(os.path.normpath(workdir)), _cell(values),
            _number(metrics.get('box_AP')), _number(metrics.get('mask_AP')),
            str(run['step']), _number(run.get('train_images_per_sec'))]) + ' |')
    return '\n'.join(rows)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m projects.maskrcnn.tools.compare',
        description='Markdown table of several runs side by side, from WORKDIR/results.json.')
    parser.add_argument('workdirs', nargs='+', metavar='WORKDIR')
    args = parser.parse_args(argv)
    try:
        runs = [load_results(w) for w in args.workdirs]
    except (OSError, ValueError) as e:
        print(f'compare: {e}', file=sys.stderr)
        return 1
    print(markdown_table(args.workdirs, runs))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
