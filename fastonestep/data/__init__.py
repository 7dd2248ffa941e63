"""Datasets: 2-D toys with exact densities, offline MNIST, the user's own image folders / .npz files and VAE
latent folders; loaders (memory, torch DataLoader, DALI) behind one factory, make_loader."""
from .datasets import DATASET_KINDS, TensorDataset, make_dataset
from .errors import DataError
from .files import FileDataset
from .images import load_image_folder, load_npz
from .loaders import make_loader, open_dataset
from .mixture import GaussianMixture
from .mnist import load_mnist
from .toy2d import TOYS, make_toy

__all__ = [
    "DATASET_KINDS", "DataError", "FileDataset", "GaussianMixture", "TOYS", "TensorDataset", "load_image_folder",
    "load_mnist", "load_npz", "make_dataset", "make_loader", "make_toy", "open_dataset",
]
