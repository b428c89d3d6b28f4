"""Top-level evaluations: score images, a checkpoint's samples, or a VAE's reconstructions; summarise them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lddpm import __version__
from lddpm.distributed import resolve_device
from lddpm.errors import LddpmError
from lddpm.evaluate.generate import ForwardCounter, balanced_labels, find_denoiser, generate_resumable, load_images, peak_memory
from lddpm.data import open_cache, prepare
from lddpm.evaluate.reference import (load_extractor, maybe_tqdm, now_iso, parse_reference, reference_indices,
                                      reference_size, reference_stats)
from lddpm.io import locks_folder, require_free_space, write_json
from lddpm.metrics import (FeatureExtractor, FeatureStats, ReferenceStats, check_images, class_accuracy,
                           class_probabilities, inception_score, load_classifier, load_is_network,
                           network_probabilities, precision_recall)
from lddpm.metrics.classifier import default_classifier_dir
from lddpm.metrics.kid import kernel_inception_distance
from lddpm.guidance import evaluations_per_step
from lddpm.pipeline import load_pipeline
from lddpm.sampling import SamplingSpec, default_num_steps


def evaluate_generated(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    reference_stats: ReferenceStats,
    extractor: FeatureExtractor,
    classifier: nn.Module | None = None,
    classifier_meta: dict | None = None,
    is_network: nn.Module | None = None,
    is_network_info: dict | None = None,
    pr_k: int = 3,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Score uint8 (N, H, W, C) images: FID, precision/recall, classifier score and class accuracy, and IS.

    FID is against `reference_stats` (Eq. 6 of Heusel et al. 2017). With N <= feature dim the
    covariance is rank-deficient: a warning, and `full_rank_covariance: false` in the result.
    """
    images = check_images(images, "generated images")
    n, h, w, c = images.shape
    ref_res = reference_stats.manifest.get("resolution")
    if ref_res is not None and (h, w) != (ref_res, ref_res):
        raise LddpmError(
            f"generated images are {h}x{w} but the reference statistics were built at {ref_res}x{ref_res}; "
            "build a reference at the images' resolution"
        )
    ref_sha = reference_stats.manifest.get("network_sha1")
    if ref_sha is not None and extractor.sha1 is not None and ref_sha != extractor.sha1:
        raise LddpmError(
            f"the reference statistics were made with feature network sha1 {ref_sha}, but this evaluation uses "
            f"{extractor.sha1}; rebuild the reference with the same network"
        )
    feats = extractor.features(images, progress=progress, desc="FID features")
    stats = FeatureStats().update(feats)
    if not stats.full_rank:
        warnings.warn(
            f"FID with N={n} images <= feature dimension {stats.dim}: the covariance is not full rank; "
            "the value is biased (compare FIDs only at equal N)",
            stacklevel=2,
        )
    out: dict = {
        "num_images": n,
        "resolution": h,
        "channels": c,
        "fid": reference_stats.frechet_distance(stats.mean, stats.cov),
        "full_rank_covariance": stats.full_rank,
        "feature_dim": stats.dim,
        "feature_network": extractor.info,
        "reference": {k: v for k, v in reference_stats.manifest.items() if k not in ("network",)},
    }
    real = reference_stats.features
    if real is not None and len(real) > pr_k and n > pr_k:
        m = min(len(real), n)  # the reference keeps its real features in seeded random order (reference.py)
        pr = precision_recall(real[:m], feats[:m], k=pr_k)
        out.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr_k, pr_num=m,
                   pr_real_subset={"seed": reference_stats.manifest.get("pr_subset_seed"), "size": m,
                                   "of": reference_stats.manifest.get("num")})
    else:
        out.update(precision=None, recall=None)
    # KID (Binkowski et al. 2018) against the reference's kept real features (a seeded random subset); unbiased at any N
    out.update(kid=None, kid_std=None)
    if real is not None and len(real) >= 2 and n >= 2:
        out.update(kernel_inception_distance(real, feats))
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise LddpmError(f"labels must have shape ({n},), got {labels.shape}")
    out.update(classifier_score=None, class_accuracy=None, classifier=None)
    if classifier is not None:
        probs = class_probabilities(classifier, images, device=device, progress=progress)
        out["classifier_score"] = inception_score(probs)[0]
        if labels is not None:
            out["class_accuracy"] = class_accuracy(probs, labels)
        out["classifier"] = dict(classifier_meta or {})
    out.update(inception_score=None, inception_score_std=None, is_network=None)
    if is_network is not None:
        probs = network_probabilities(is_network, images, device=device, progress=progress)
        splits = 10 if n >= 100 else 1  # the customary 10 splits (Salimans et al. 2016)
        out["inception_score"], out["inception_score_std"] = inception_score(probs, splits)
        out["is_network"] = {**(is_network_info or {}), "splits": splits}
    return out


def real_data_floor(
    dataset: str,
    *,
    reference: ReferenceStats,
    split: str,
    num: int,
    resolution: int,
    extractor: FeatureExtractor,
    cache_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """FID and KID of `num` real images of DATASET:SPLIT against `reference`: what a perfect model scores at this N."""
    if split == reference.manifest.get("split"):
        raise LddpmError(f"the real-data floor needs a split other than the reference's ({split!r}); e.g. train vs test")
    cache = open_cache(prepare(dataset, resolution=resolution, split=split, root=data_root, cache_dir=cache_dir, progress=progress))
    if num > len(cache):
        raise LddpmError(f"the real-data floor needs {num} images but {dataset}:{split} has {len(cache)}; use a smaller N")
    images = check_images(np.asarray(cache.images[reference_indices(len(cache), num)]), f"{dataset}:{split} images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rank-deficient-covariance warning: the floor shares it with the cells
        result = evaluate_generated(images, reference_stats=reference, extractor=extractor, progress=progress)
    keys = ("fid", "kid", "kid_std", "kid_subsets", "kid_subset_size", "kid_seed", "full_rank_covariance")
    return {"dataset": dataset, "split": split, "num": num, **{k: result.get(k) for k in keys},
            "reference": result["reference"]}


def resolve_classifier(
    classifier: str | Path | None, dataset: str | None, resolution: int, *, cache_dir=None, device="cpu"
) -> tuple[nn.Module | None, dict | None, str | None]:
    """classifier 'auto' (the default folder if it exists), a folder, or None/'none' -> (model, meta, note)."""
    if classifier in (None, "none"):
        return None, None, None
    if classifier == "auto":
        if dataset is None:
            return None, None, "no classifier: dataset unknown"
        folder = default_classifier_dir(dataset, resolution, cache_dir)
        if not folder.is_dir():
            return None, None, f"no classifier metrics: run `lddpm train-classifier {dataset} --resolution {resolution}`"
        shown = f"<cache>/classifiers/{folder.name}"   # result files name the cache, not this machine's home
    else:
        folder = shown = Path(classifier)
    model, meta = load_classifier(folder, device)
    if meta.get("resolution") not in (None, resolution):
        raise LddpmError(
            f"classifier {str(folder)!r} was trained at {meta['resolution']}px, the images are {resolution}px; "
            f"train one with `lddpm train-classifier {meta.get('dataset', 'DATASET')} --resolution {resolution}`"
        )
    return model, {**meta, "path": str(shown)}, None


def _prompt_records(prompts, num: int) -> list[dict]:
    """A text run's prompt records, cycled to `num` (a JSONL file or a list of {"prompt": ...} records)."""
    if prompts is None:
        raise LddpmError("this is a text run: give a prompt set (--prompts FILE: JSONL with a `prompt` per line, "
                         "e.g. from lddpm.data.scenes.write_prompt_set)")
    records = read_prompt_records(prompts)
    return [records[i % len(records)] for i in range(num)]


def read_prompt_records(prompts: str | Path | list[dict]) -> list[dict]:
    """Prompt records {"prompt", ...}: from a JSONL file (a `prompt` or `text` field per line, every field kept),
    a text file (one prompt a non-empty line), or given as a list of records (copied)."""
    if isinstance(prompts, (str, Path)):
        path = str(prompts)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LddpmError(f"--prompts {path}: not UTF-8 text; save it as UTF-8") from None
        except OSError as exc:
            raise LddpmError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                records.append({"prompt": line.strip()})
                continue
            try:
                record = json.loads(line)
                records.append({**record, "prompt": record["prompt"] if "prompt" in record else record["text"]})
            except (ValueError, KeyError, TypeError):
                raise LddpmError(f"--prompts {path}, line {number}: expected a JSON object with a `prompt` "
                                 "(or `text`) field") from None
        if not records:
            raise LddpmError(f"--prompts {path} holds no prompt")
    else:
        records = [dict(r) for r in prompts]
    if not records or any(not isinstance(r.get("prompt"), str) for r in records):
        raise LddpmError("a prompt set needs at least one record with a `prompt` string")
    return records


def _records_sha256(records: list[dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _faithfulness(images: np.ndarray, records: list[dict], cache_dir) -> dict:
    """Prompt-faithfulness scores, the checker's ceiling on real test scenes, and their ratios."""
    from lddpm.metrics import faithfulness

    checker = faithfulness.load_checker(faithfulness.default_checker_dir(cache_dir))
    scores = faithfulness.score_prompts(images, records, checker=checker)
    ceiling = faithfulness.ceiling(scores["task"], records, checker=checker)
    keys = ("class_accuracy", "all_accuracy", "slot_accuracy", "pair_accuracy", "presence")
    ratios = {k: scores[k] / ceiling[k] for k in keys if scores.get(k) is not None and ceiling.get(k)}
    return {"scores": scores, "ceiling": ceiling, "of_ceiling": ratios}


def _is_network(path, sha1, device):
    if path is None:
        return None, None
    net, digest = load_is_network(path, sha1)
    return net.to(device), {"path": str(path), "sha1": digest}


def check_partial_space(partial_dir: str | Path, num: int, batch_size: int, image_bytes: int) -> None:
    """Refuse `num` images whose sample batches (uncompressed .npz) cannot fit the free disk, before sampling starts."""
    done = len(list(Path(partial_dir).glob("batch-*.npz"))) if Path(partial_dir).is_dir() else 0
    todo = max(0, num - done * batch_size)
    batches = -(-todo // batch_size)
    needed = todo * (image_bytes + 8) + batches * 4096  # images, int64 labels, the npz headers (a block per file)
    require_free_space(partial_dir, needed, f"{todo} more sample images (--num {num})",
                       "lower --num, free some space or write the results elsewhere (--out)")


class Scorer:
    """What scores generated images, built once and reused for many evaluations (the study keeps one).

    The FID feature network (`extractor`, or the pinned Inception / a user's file `inception` with its
    `inception_sha1` and `feature_backend`; loaded on first use), the reference statistics (`reference`:
    ReferenceStats, "DATASET:SPLIT", or None for the run's dataset's train split; `ref_num` images of it,
    None: as many as the evaluation's N, 0: the whole split; built or loaded once per dataset, split, N and
    resolution), the classifier for class accuracy and the classifier score (`classifier`: a folder, "auto"
    for the default one when it exists, None/"none"), the network of a standard Inception Score
    (`is_network`, optional), and the prompt-faithfulness checker of text runs (from `cache_dir`).
    `batch_size` is the feature network's batch size; `device` ("auto", "cpu", "cuda") runs the networks.
    """

    def __init__(self, *, reference: str | ReferenceStats | None = None, ref_num: int | None = None,
                 extractor: FeatureExtractor | None = None, inception: str | Path | None = None,
                 inception_sha1: str | None = None, feature_backend: str = "auto",
                 classifier: str | Path | None = "auto", is_network: str | Path | None = None,
                 is_network_sha1: str | None = None, batch_size: int = 64, device: str = "auto",
                 cache_dir: str | Path | None = None, data_root: str | Path | None = None, progress: bool = True):
        if extractor is not None and (inception is not None or inception_sha1 is not None):
            raise LddpmError("give the Scorer a feature `extractor` or an `inception` network file, not both")
        if isinstance(reference, ReferenceStats) and ref_num is not None:
            raise LddpmError("ref_num applies to a reference named as DATASET:SPLIT, not to given ReferenceStats")
        self.reference, self.ref_num = reference, ref_num
        self._extractor = extractor
        self.inception, self.inception_sha1, self.feature_backend = inception, inception_sha1, feature_backend
        self.classifier, self.is_network, self.is_network_sha1 = classifier, is_network, is_network_sha1
        self.batch_size, self.device = batch_size, str(resolve_device(device))
        self.cache_dir, self.data_root, self.progress = cache_dir, data_root, progress
        self._references: dict[tuple, ReferenceStats] = {}
        self._classifiers: dict[tuple, tuple] = {}
        self._is: tuple | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The FID feature network (loaded on first use)."""
        if self._extractor is None:
            self._extractor = load_extractor(self.inception, self.inception_sha1, batch_size=self.batch_size,
                                             device=self.device, backend=self.feature_backend, cache_dir=self.cache_dir)
        return self._extractor

    def reference_for(self, dataset: str | None, resolution: int, num: int) -> ReferenceStats:
        """The reference statistics for `num` generated images of `dataset` at `resolution` (cached)."""
        if isinstance(self.reference, ReferenceStats):
            return self.reference
        ref_dataset, ref_split = parse_reference(self.reference or f"{dataset}:train")
        if ref_dataset in (None, "None"):
            raise LddpmError("the checkpoint does not name its dataset; pass --reference DATASET:SPLIT")
        key = (ref_dataset, ref_split, reference_size(self.ref_num, num), resolution)
        if key not in self._references:
            self._references[key] = reference_stats(
                ref_dataset, split=ref_split, num=key[2], resolution=resolution, extractor=self.extractor,
                cache_dir=self.cache_dir, data_root=self.data_root, progress=self.progress)
        return self._references[key]

    def classifier_for(self, dataset: str | None, resolution: int) -> tuple[nn.Module | None, dict | None, str | None]:
        """(classifier, its metadata, a note when there is none) for images of `dataset` at `resolution` (cached)."""
        key = (dataset, resolution)
        if key not in self._classifiers:
            self._classifiers[key] = resolve_classifier(self.classifier, dataset, resolution, cache_dir=self.cache_dir,
                                                        device=self.device)
        return self._classifiers[key]

    def inception_network(self) -> tuple[nn.Module | None, dict | None]:
        """(network, info) of the standard Inception Score, or (None, None) (loaded once)."""
        if self._is is None:
            self._is = _is_network(self.is_network, self.is_network_sha1, self.device)
        return self._is

    def score(self, images: np.ndarray, labels: np.ndarray | None, *, dataset: str | None, num: int,
              classes: bool = True, records: list[dict] | None = None) -> tuple[dict, str | None]:
        """(metrics, note): `evaluate_generated` of the images against this scorer's reference (for `num` images of
        `dataset`), class metrics when `classes`, prompt faithfulness when `records` describe benchmark scenes."""
        resolution = int(images.shape[1])
        reference = self.reference_for(dataset, resolution, num)
        clf, clf_meta, note = self.classifier_for(dataset, resolution) if classes else (None, None, None)
        is_net, is_info = self.inception_network()
        metrics = evaluate_generated(
            images, labels, reference_stats=reference, extractor=self.extractor, classifier=clf,
            classifier_meta=clf_meta, is_network=is_net, is_network_info=is_info, device=self.device,
            progress=self.progress)
        if records is not None and all(r.get("objects") for r in records):
            metrics["faithfulness"] = _faithfulness(images, records, self.cache_dir)
        return metrics, note


# evaluate_checkpoint's keywords before SamplingSpec / Scorer (still accepted): which object each belongs to
SPEC_KEYWORDS = ("sampler", "num_steps", "eta", "spacing", "guidance_scale", "guide", "guide_scale",
                 "guidance_interval", "labels", "prompts", "negative_prompt", "seed", "batch_size", "bf16",
                 "sampler_options")
SCORER_KEYWORDS = ("reference", "ref_num", "extractor", "inception", "inception_sha1", "feature_backend",
                   "classifier", "is_network", "is_network_sha1", "cache_dir", "data_root")


def _spec_and_scorer(spec, scorer, device, progress, keywords: dict) -> tuple[SamplingSpec, Scorer]:
    """The SamplingSpec and Scorer of a call, from the objects or from evaluate_checkpoint's older keywords."""
    unknown = sorted(set(keywords) - set(SPEC_KEYWORDS) - set(SCORER_KEYWORDS))
    if unknown:
        raise TypeError(f"evaluate_checkpoint() got unexpected keyword argument(s) {', '.join(unknown)}")
    spec_kw = {k: v for k, v in keywords.items() if k in SPEC_KEYWORDS}
    scorer_kw = {k: v for k, v in keywords.items() if k in SCORER_KEYWORDS}
    if spec is not None and spec_kw:
        raise LddpmError(f"give the sampling settings in the SamplingSpec or as keywords, not both "
                         f"(got {', '.join(sorted(spec_kw))} beside a spec)")
    if scorer is not None and scorer_kw:
        raise LddpmError(f"give the scoring settings in the Scorer or as keywords, not both "
                         f"(got {', '.join(sorted(scorer_kw))} beside a scorer)")
    spec = spec if spec is not None else SamplingSpec(**spec_kw)
    if scorer is None:
        if isinstance(scorer_kw.get("reference"), ReferenceStats):
            scorer_kw.pop("ref_num", None)  # the older form ignored it beside given statistics
        scorer = Scorer(**scorer_kw, batch_size=spec.batch_size, device=device or "auto", progress=progress)
    return spec, scorer


def planned_nfe(pipeline, spec: SamplingSpec, num_steps: int) -> tuple[int, int] | None:
    """(main-network rows, guide-network rows) per image the sampler will cost, or None for a pipeline without a
    diffusion: for each model evaluation of the sampler (`SamplingSpec.evaluation_sigmas`, the same list
    `count_model_evaluations` and the cost's `nfe_expected` count: Heun 2N - 1, sigma-space grids, churn), the
    rows guidance costs at its noise level (`lddpm.guidance.evaluations_per_step`: CFG 2, a guide 1 more, 1
    outside the guidance interval)."""
    diffusion = getattr(pipeline, "diffusion", None)
    if diffusion is None:
        return None
    main = guide = 0
    for sigma in spec.replace(num_steps=num_steps).evaluation_sigmas(diffusion):
        m, g = evaluations_per_step(sigma, guidance_scale=spec.guidance_scale,
                                    guide_scale=spec.guide_scale, interval=spec.guidance_interval,
                                    guide=getattr(pipeline, "guide", None) is not None)
        main, guide = main + m, guide + g
    return main, guide


@locks_folder("partial_dir", "partial samples folder")  # one writer per partial folder
def evaluate_checkpoint(
    path: str | Path,
    spec: SamplingSpec | None = None,
    scorer: Scorer | None = None,
    *,
    num: int,
    partial_dir: str | Path | None = None,
    pipeline=None,
    device: str | None = None,
    progress: bool = True,
    **keywords,
) -> dict:
    """Sample `num` images from a run or checkpoint (resumable), score them and measure the sampling cost.

    `spec` (lddpm.SamplingSpec) says how to sample: sampler, steps, eta, spacing, guidance (CFG scale,
    autoguidance's guide and scale, the guidance interval), sampler options, labels, prompts, seed, batch size,
    bf16.
    `scorer` (Scorer) holds what scores: feature network, reference, classifier, IS network; build it once
    for many evaluations. The older keywords (sampler=, guidance_scale=, reference=, classifier=, ...: the
    fields of the two objects, see SPEC_KEYWORDS and SCORER_KEYWORDS) still work, instead of the objects
    (never beside them).

    A text run samples from a prompt set (spec.prompts: a JSONL file of {"prompt", ...} records or the
    records themselves, cycled to `num`; spec.negative_prompt replaces the null prompt of guidance).
    Records that describe benchmark scenes (`objects`, as `lddpm.data.scenes.write_prompt_set` writes)
    are also scored for prompt faithfulness by lddpm.metrics.faithfulness, with the checker's score on
    real rendered test scenes for the same prompts as the ceiling.

    `pipeline` may be given directly (anything with `.generate`, `.num_classes`, `.resolution`,
    `.dataset`); otherwise `lddpm.pipeline.load_pipeline(path, device, bf16=spec.bf16, guide=spec.guide)`
    is used. `device` (default: the scorer's) is where the pipeline is loaded.
    `spec.sampler_options` (the step grid, sigma_min, epsilon scaling, churn, order; `lddpm.sampling.sample`) go to
    every batch and, when set, into the settings (and so into the partial folder's check).

    The cost records `nfe`: network forward rows per image, main and guide networks together (counted, or planned
    by `planned_nfe` when every batch was resumed; `nfe_source` says which), and `nfe_expected`: the sampler's
    (guided) model evaluations per batch from its grid (`count_model_evaluations`; Heun 2N - 1), which
    `model_calls_per_batch` counts. Without guidance nfe = nfe_expected; CFG doubles nfe, not nfe_expected.
    """
    spec, scorer = _spec_and_scorer(spec, scorer, device, progress, keywords)
    device = str(resolve_device(device or scorer.device))
    if pipeline is None:
        pipeline = load_pipeline(path, device=device, bf16=spec.bf16, guide=spec.guide)
    elif spec.guide is not None and getattr(pipeline, "guide_source", None) != spec.guide:
        pipeline.set_guide(spec.guide)
    batch_size = spec.batch_size
    if partial_dir is not None:
        check_partial_space(partial_dir, num, batch_size, int(pipeline.resolution) ** 2 * int(getattr(pipeline, "channels", 3)))
    num_steps = spec.num_steps
    if num_steps is None and hasattr(pipeline, "diffusion"):  # the sampler's default (all T for ddpm), as `lddpm sample`
        num_steps = default_num_steps(spec.sampler, pipeline.diffusion.num_timesteps)
    options = spec.options()
    gen_options = {"sampler_options": options} if options else {}  # a plain pipeline need not take the keyword
    num_classes = int(getattr(pipeline, "num_classes", 0) or 0)
    want_labels = balanced_labels(num, num_classes) if (num_classes and spec.labels == "balanced") else None
    # a conditional model sampled without labels gets the null label (unconditional samples)
    gen_labels = np.full(num, num_classes, np.int64) if (num_classes and want_labels is None) else want_labels
    records = None
    if spec.prompts is not None or int(getattr(pipeline, "context_dim", 0) or 0):
        records = _prompt_records(spec.prompts, num)
        want_labels = gen_labels = np.arange(num, dtype=np.int64)  # prompt indices, carried as labels
    guidance_scale = spec.guidance_scale
    if guidance_scale != 1.0 and want_labels is None:
        raise LddpmError(f"--guidance-scale {guidance_scale} needs a class-conditional model sampled with --labels balanced")
    prompts = spec.prompts
    scorer.reference_for(getattr(pipeline, "dataset", None), int(pipeline.resolution), num)  # before sampling: fail early
    settings = {
        "checkpoint": str(path),
        "num": num,
        "sampler": spec.sampler,
        "num_steps": num_steps,
        "eta": spec.eta,
        "guidance_scale": guidance_scale,
        "labels": "balanced" if want_labels is not None else "none",
        "seed": spec.seed,
        "batch_size": batch_size,
        "bf16": bool(getattr(pipeline, "bf16", False)),
        **spec.guidance_settings(),  # guide, guide_scale, guidance_interval, spacing: only when used
    }
    if spec.guide is not None:
        settings["guide"] = str(getattr(pipeline, "guide_checkpoint", None) or spec.guide)  # the file it read
    if options:  # only when given: settings (and partial folders) of runs without options stay as they were
        settings["sampler_options"] = options
    if records is not None:
        settings["labels"] = "prompts"
        settings["prompts"] = str(prompts) if isinstance(prompts, (str, Path)) else f"{len(records)} records"
        settings["prompts_sha256"] = _records_sha256(records)
        settings["negative_prompt"] = spec.negative_prompt
    denoiser = find_denoiser(pipeline)
    guide_net = getattr(pipeline, "guide", None) if spec.guide_scale != 1.0 else None  # loaded but unused: not counted
    guide_net = guide_net if isinstance(guide_net, nn.Module) and guide_net is not denoiser else None
    counter, guide_counter = ForwardCounter(denoiser), ForwardCounter(guide_net)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    guidance = {k: v for k, v in (("guide_scale", spec.guide_scale), ("guidance_interval", spec.guidance_interval),
                                  ("spacing", spec.spacing)) if v is not None and not (k == "guide_scale" and v == 1.0)}

    def generate_batch(n, batch_labels, batch_seed_):
        common = dict(sampler=spec.sampler, num_steps=num_steps, eta=spec.eta, guidance_scale=guidance_scale,
                      seed=batch_seed_, batch_size=n, progress=False, **guidance, **gen_options)
        if records is not None:  # batch_labels are prompt indices
            images, _ = pipeline.generate(n, prompts=[records[int(i)]["prompt"] for i in batch_labels],
                                          negative_prompt=spec.negative_prompt, **common)
            return images, batch_labels
        return pipeline.generate(n, labels=batch_labels, **common)

    try:
        images, out_labels, timing = generate_resumable(
            generate_batch, num, batch_size=batch_size, labels=gen_labels, seed=spec.seed,
            partial_dir=partial_dir, settings=settings, progress=progress,
        )
    finally:
        counter.close()
        guide_counter.close()
    cost = {**timing, **peak_memory(device), "device": str(device)}
    generated = timing["num_generated_now"]
    planned = planned_nfe(pipeline, spec, num_steps) if num_steps else None
    if denoiser is not None and generated:
        batches = -(-generated // batch_size)
        cost.update(
            model_calls=counter.calls,
            model_calls_per_batch=counter.calls / batches,  # the sampler's NFE
            network_evaluations_per_image=counter.rows / generated,  # CFG doubles this
            network_evaluations_per_image_step=counter.rows / generated / num_steps if num_steps else None,
        )
        if guide_net is not None:
            cost.update(guide_model_calls=guide_counter.calls, guide_evaluations_per_image=guide_counter.rows / generated)
        cost.update(nfe=(counter.rows + guide_counter.rows) / generated, nfe_source="counted")
    else:
        cost.update(model_calls=None, model_calls_per_batch=None, network_evaluations_per_image=None,
                    network_evaluations_per_image_step=None)
        cost.update(nfe=sum(planned) if planned else None, nfe_source="planned" if planned else None)
    if hasattr(pipeline, "diffusion") and num_steps:  # what the sampler should cost per batch (Heun: 2N - 1)
        cost["nfe_expected"] = len(spec.replace(num_steps=num_steps).evaluation_sigmas(pipeline.diffusion))
    metrics, note = scorer.score(
        images, out_labels if (want_labels is not None and records is None) else None, dataset=getattr(pipeline, "dataset", None),
        num=num, classes=records is None, records=records)  # prompts, not classes: no class accuracy
    return {"kind": "samples", **metrics, "cost": cost, "settings": settings, "notes": [note] if note else [],
            "lddpm_version": __version__, "created": now_iso()}


def evaluate_image_files(
    images_path: str | Path,
    *,
    reference: str | ReferenceStats,
    ref_num: int | None = None,
    extractor: FeatureExtractor | None = None,
    classifier: str | Path | None = "auto",
    is_network: str | Path | None = None,
    is_network_sha1: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir=None,
    data_root=None,
    progress: bool = True,
) -> dict:
    """Score images made elsewhere (PNG folder or npz) against DATASET:SPLIT at the images' resolution."""
    images, labels = load_images(images_path)
    resolution = images.shape[1]
    extractor = extractor or load_extractor(batch_size=batch_size, device=device)
    dataset = None
    if not isinstance(reference, ReferenceStats):
        dataset, split = parse_reference(reference)
        reference = reference_stats(dataset, split=split, num=reference_size(ref_num, len(images)), resolution=resolution,
                                    extractor=extractor, cache_dir=cache_dir, data_root=data_root, progress=progress)
    clf, clf_meta, note = resolve_classifier(classifier, dataset, resolution, cache_dir=cache_dir, device=device)
    is_net, is_info = _is_network(is_network, is_network_sha1, device)
    metrics = evaluate_generated(images, labels, reference_stats=reference, extractor=extractor, classifier=clf,
                                 classifier_meta=clf_meta, is_network=is_net, is_network_info=is_info,
                                 device=device, progress=progress)
    return {"kind": "images", **metrics, "settings": {"images": str(images_path), "num": len(images)},
            "notes": [note] if note else [], "lddpm_version": __version__, "created": now_iso()}


@torch.inference_mode()
def vae_reconstructions(vae: nn.Module, images: np.ndarray, *, batch_size: int = 64, device="cpu", progress=False) -> np.ndarray:
    """uint8 reconstructions decode(encode(x).mode()), clamped to [-1, 1], of uint8 (N, H, W, C) images."""
    out = []
    vae = vae.to(device).eval()
    for i in maybe_tqdm(range(0, len(images), batch_size), progress, desc="VAE reconstructions", unit="batch"):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        out.append(((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def evaluate_vae(
    vae: nn.Module,
    cache,
    *,
    reference_stats: ReferenceStats,
    extractor: FeatureExtractor,
    num: int | None = None,
    batch_size: int = 64,
    device="cpu",
    progress: bool = False,
) -> dict:
    """Reconstruct the first `num` images of `cache` (a test split) and score them: FID vs the reference, MSE, PSNR.

    MSE and PSNR are on [0, 1] pixels (PSNR = 10 log10(1 / MSE) per image, then averaged), from
    the uint8 reconstructions that FID sees.
    """
    num = min(int(num or len(cache)), len(cache))
    originals = check_images(np.asarray(cache.images[:num]), "test images")
    recon = vae_reconstructions(vae, originals, batch_size=batch_size, device=device, progress=progress)
    if recon.shape != originals.shape:
        raise LddpmError(f"the VAE returned reconstructions of shape {recon.shape} for images {originals.shape}")
    err = ((recon.astype(np.float64) - originals.astype(np.float64)) / 255.0) ** 2
    mse_per_image = err.reshape(num, -1).mean(axis=1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse_per_image, 1e-12))
    metrics = evaluate_generated(recon, None, reference_stats=reference_stats, extractor=extractor, device=device,
                                 progress=progress)
    return {
        "kind": "vae",
        **metrics,
        "mse": float(mse_per_image.mean()),
        "psnr": float(psnr.mean()),
        "source": {"dataset": getattr(cache, "dataset", None), "split": getattr(cache, "split", None), "num": num},
        "lddpm_version": __version__,
        "created": now_iso(),
    }


def summary_line(result: dict) -> str:
    """One line with the headline numbers of an evaluation result."""
    ref = result.get("reference", {})
    parts = [f"FID {result['fid']:.2f} (N={result['num_images']} vs {ref.get('dataset')}:{ref.get('split')} N={ref.get('num')})"]
    if result.get("kid") is not None:
        parts.append(f"KID x10^3 {result['kid'] * 1e3:.2f} +- {result['kid_std'] * 1e3:.2f} (subsets of {result['kid_subset_size']})")
    if result.get("precision") is not None:
        parts.append(f"precision {result['precision']:.3f} recall {result['recall']:.3f}")
    if result.get("classifier_score") is not None:
        parts.append(f"classifier score {result['classifier_score']:.2f}")
    if result.get("class_accuracy") is not None:
        parts.append(f"class accuracy {result['class_accuracy']:.3f}")
    if result.get("inception_score") is not None:
        parts.append(f"IS {result['inception_score']:.2f}")
    faith = (result.get("faithfulness") or {}).get("scores")
    if faith:
        keys = ("class_accuracy", "all_accuracy") if faith["task"] == "fashion-text" else \
            ("slot_accuracy", "pair_accuracy", "swap_rate")
        ceiling = result["faithfulness"]["ceiling"]
        parts.append(", ".join(f"{k.replace('_', ' ')} {faith[k]:.3f} (ceiling {ceiling[k]:.3f})"
                               for k in keys if faith.get(k) is not None))
    if "psnr" in result:
        parts.append(f"PSNR {result['psnr']:.2f} dB MSE {result['mse']:.5f}")
    cost = result.get("cost") or {}
    if cost.get("seconds_per_image") is not None:
        parts.append(f"{cost['seconds_per_image']:.3f} s/image ({cost['images_per_second']:.2f} img/s)")
    if cost.get("model_calls_per_batch") is not None:
        guide = cost.get("guide_evaluations_per_image")
        guided = f" + {guide:.0f} guide evals" if guide is not None else ""
        parts.append(f"NFE {cost['model_calls_per_batch']:.0f} ({cost['network_evaluations_per_image']:.0f} net evals"
                     f"{guided}/image)")
    if cost.get("peak_memory_mib") is not None:
        parts.append(f"peak {cost['peak_memory_mib']:.0f} MiB")
    if not result.get("full_rank_covariance", True):
        parts.append(f"[N <= {result.get('feature_dim')}: rank-deficient covariance]")
    return " | ".join(parts)


def write_result(result: dict, out: str | Path) -> Path:
    """Write an evaluation result as indented JSON (atomically)."""
    return write_json(out, result)
