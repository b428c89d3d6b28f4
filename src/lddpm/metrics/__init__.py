"""FID, KID, classifier score, Inception Score, class accuracy, precision/recall.

A leaf package: it knows nothing of training, sampling or the CLI.
"""

from lddpm.metrics.classifier import (
    SmallClassifier,
    class_accuracy,
    class_probabilities,
    inception_score,
    load_classifier,
    load_is_network,
    network_probabilities,
    save_classifier,
    train_classifier,
)
from lddpm.metrics.fid import (
    FeatureStats,
    ReferenceStats,
    default_cache_dir,
    fid_from_features,
    frechet_distance,
    load_reference,
    save_reference,
)
from lddpm.metrics.inception import (
    FEATURE_DIM,
    INCEPTION_SHA1,
    FeatureExtractor,
    check_images,
    find_inception_file,
    load_inception,
    nvidia_prologue,
    nvidia_resize,
)
from lddpm.metrics.kid import kernel_inception_distance
from lddpm.metrics.precision_recall import precision_recall

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SHA1",
    "FeatureExtractor",
    "FeatureStats",
    "ReferenceStats",
    "SmallClassifier",
    "check_images",
    "class_accuracy",
    "class_probabilities",
    "default_cache_dir",
    "fid_from_features",
    "find_inception_file",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_classifier",
    "load_inception",
    "load_is_network",
    "load_reference",
    "network_probabilities",
    "nvidia_prologue",
    "nvidia_resize",
    "precision_recall",
    "save_classifier",
    "save_reference",
    "train_classifier",
]
