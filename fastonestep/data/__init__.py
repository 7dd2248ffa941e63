"""Datasets: 2-D toys with exact densities, offline MNIST, and the user's own image folders / .npz files."""
from .datasets import DATASET_KINDS, TensorDataset, make_dataset
from .errors import DataError
from .images import load_image_folder, load_npz
from .mixture import GaussianMixture
from .mnist import load_mnist
from .toy2d import TOYS, make_toy

__all__ = [
    "DATASET_KINDS", "DataError", "GaussianMixture", "TOYS", "TensorDataset", "load_image_folder", "load_mnist",
    "load_npz", "make_dataset", "make_toy",
]
