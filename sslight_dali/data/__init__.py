"""Data and view sampling: sources, the DALI graph, the torchvision reference, loaders.

Importing this package does not import DALI: the DALI graph (dali_views.py) and loaders (loader.py)
are imported when a DALI loader is built, so sources, errors and the torchvision backend work on a
machine without `nvidia.dali`."""
from .build import build_eval_loader, build_train_loader, linear_probe_recipe
from .sources import DataError, PipelinesDoNotFit, Samples, list_samples

__all__ = ["build_train_loader", "build_eval_loader", "linear_probe_recipe", "DataError", "PipelinesDoNotFit", "Samples", "list_samples"]
