"""Plugs into Google's Scenic when it is installed, and stands in for it otherwise.

PyPI's `scenic` is an unrelated package, so "Scenic is installed" means its
training library imports: `scenic.train_lib`. Everything the project needs
from Scenic is imported here, once.
"""

from typing import Any

from absl import logging

try:
    import scenic.train_lib  # noqa: F401  (the detection; Scenic's app needs TF too)
    from scenic import app as scenic_app
    from scenic.dataset_lib import dataset_utils as scenic_dataset_utils
    from scenic.dataset_lib import datasets as scenic_datasets
    from scenic.model_lib.base_models import base_model as scenic_base_model
    SCENIC_AVAILABLE = True
except ImportError:  # Only the absence of Scenic is expected here.
    scenic_app = scenic_dataset_utils = scenic_datasets = scenic_base_model = None
    SCENIC_AVAILABLE = False


if SCENIC_AVAILABLE:
    BaseModel = scenic_base_model.BaseModel
else:
    class BaseModel:
        """Stand-in with the constructor contract of Scenic's BaseModel."""

        def __init__(self, config: Any, dataset_meta_data: dict[str, Any]) -> None:
            if config is None:
                logging.warning('Creating the model with its default config.')
                config = self.default_flax_model_config()
            self.config = config
            self.dataset_meta_data = dataset_meta_data
            self.flax_model = self.build_flax_model()


def runtime_name() -> str:
    return 'scenic' if SCENIC_AVAILABLE else 'detectax (in-project runtime; Scenic not installed)'
