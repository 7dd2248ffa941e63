"""Evaluation: Frechet distance with pluggable features, MNIST FD (a small local classifier's features; not
FID), and exact-distribution metrics for 2-D toys."""
from .frechet import feature_stats, frechet_distance, load_stats, save_stats
from .mnist_features import class_coverage, get_mnist_classifier, mnist_fd, mnist_features
from .toy_metrics import energy_distance, log_likelihood, mmd_rbf, mode_stats, toy_metrics

__all__ = [
    "class_coverage", "energy_distance", "feature_stats", "frechet_distance", "get_mnist_classifier",
    "load_stats", "log_likelihood", "mmd_rbf", "mnist_fd", "mnist_features", "mode_stats", "save_stats",
    "toy_metrics",
]

# Standard FID (InceptionV3, TF-FID port) from a local weights file.
from .inception import fid_from_images, inception_features, inception_stats, load_inception  # noqa: E402

__all__ += ["fid_from_images", "inception_features", "inception_stats", "load_inception"]

# Precision / recall / density / coverage, diversity, and the pluggable feature spaces they and FD use.
from .features import FEATURE_KINDS, compare_features, make_features  # noqa: E402
from .prdc import diversity, prdc  # noqa: E402

__all__ += ["FEATURE_KINDS", "compare_features", "diversity", "make_features", "prdc"]
