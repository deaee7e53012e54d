"""Data and view sampling: sources, the DALI graph, the torchvision reference, loaders."""
from .build import build_eval_loader, build_train_loader, linear_probe_recipe
from .sources import DataError, Samples, list_samples

__all__ = ["build_train_loader", "build_eval_loader", "linear_probe_recipe", "DataError", "Samples", "list_samples"]
