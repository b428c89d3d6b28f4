"""Evaluation: sample N images from a checkpoint, score them (FID, precision/recall, class metrics), time them.

`reference` builds and caches FID reference statistics, `generate` samples in resumable seeded
batches and measures the cost, `score` holds the `Scorer` (what scores, built once) and the top-level
evaluations (`evaluate_generated`, `evaluate_checkpoint(run, SamplingSpec, Scorer, num=...)`,
`evaluate_image_files`, `evaluate_vae`). See docs/evaluation.md.
"""

from lddpm.evaluate.generate import (ForwardCounter, balanced_labels, find_denoiser, generate_resumable, load_images,
                                     peak_memory)
from lddpm.evaluate.reference import (PR_MAX_FEATURES, REFERENCE_SUBSET_SEED, load_extractor, parse_reference,
                                      reference_from_cache, reference_indices, reference_size, reference_stats)
from lddpm.evaluate.score import (Scorer, evaluate_checkpoint, evaluate_generated, evaluate_image_files, evaluate_vae,
                                  planned_nfe, read_prompt_records, real_data_floor, resolve_classifier, summary_line,
                                  vae_reconstructions, write_result)
from lddpm.sampling import SamplingSpec
from lddpm.seeding import batch_seed

__all__ = ["PR_MAX_FEATURES", "REFERENCE_SUBSET_SEED", "ForwardCounter", "SamplingSpec", "Scorer", "balanced_labels",
           "batch_seed",
           "evaluate_checkpoint", "evaluate_generated", "evaluate_image_files", "evaluate_vae", "find_denoiser",
           "generate_resumable", "load_extractor", "load_images", "parse_reference", "peak_memory", "planned_nfe",
           "read_prompt_records", "real_data_floor", "reference_from_cache", "reference_indices", "reference_size",
           "reference_stats", "resolve_classifier", "summary_line", "vae_reconstructions", "write_result"]
