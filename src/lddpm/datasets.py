"""The dataset names lddpm reads: one list for `lddpm.data`, the config check and the CLI's choices.

A module of its own (no numpy or torch), so the command-line parser can offer the names without
importing `lddpm.data`.
"""

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet100", "imagefolder", "captioned",
            "fashion-text", "fashion-pairs")
