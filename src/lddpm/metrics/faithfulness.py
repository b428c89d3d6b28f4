"""Prompt faithfulness on the synthetic scene sets (fashion-text, fashion-pairs): a GenEval-style checker.

GenEval (Ghosh et al. 2023) checks each clause of a structured prompt with an object detector; here the
scenes are synthetic, so a per-slot classifier (10 Fashion-MNIST classes + `empty`) replaces the detector
and the attributes are measured from pixels:

- class: `SmallClassifier` (lddpm.metrics.classifier) on a 32x32 slot: the whole canvas for fashion-text,
  a 16-px-wide half zero-padded back to 32x32 for fashion-pairs (a pair slot is then exactly a centred
  small item, so one network serves both sets). Trained on rendered slots of Fashion-MNIST *train* items
  (large/small x bright/dark, +-2 px shifts, empty slots with and without faint noise).
- size: the larger side of the foreground bounding box (pixels >= `fg_threshold`) > `size_threshold`.
- brightness: a foreground intensity statistic (`brightness_feature`) > `brightness_threshold`.
Thresholds are calibrated on rendered train scenes; their accuracy on rendered test scenes is stored in
the checker's metadata. An image passes a prompt only if every clause holds (GenEval's rule).

The ceiling is the same checker on real rendered *test* scenes for the same prompts (`ceiling`), the
analogue of the real-data FID floor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lddpm import __version__
from lddpm.data import default_cache_dir
from lddpm.data import scenes
from lddpm.errors import LddpmError
from lddpm.io import atomic_dir
from lddpm.seeding import subset_indices
from lddpm.metrics.classifier import (
    SmallClassifier, class_probabilities, load_classifier, save_classifier, train_classifier,
)

CHECKER_VERSION = 1
EMPTY = 10  # the slot class "nothing here"
SLOT_CLASSES = (*scenes.CLASS_NAMES, "empty")
BRIGHTNESS_FEATURES = ("top8", "mean", "p90", "max")
ROBUST_FEATURES = ("top8", "mean", "p90")  # `max` is reported but never chosen: one stray pixel decides it
FG_CANDIDATES = (8, 16, 24, 32, 48, 64)
CALIBRATION_NOISE = (0, 4, 8)  # pixel-noise std of the calibration copies (0..255 scale)
TOLERANCE = 0.001  # calibration: accuracy given up for a threshold in the middle of the near-best range


# ---------------------------------------------------------------------------------------------
# Slots and pixel measurements


def as_canvases(images: np.ndarray, what: str = "images") -> np.ndarray:
    """uint8 (N, 32, 32, 1) or (N, 32, 32) -> (N, 32, 32); anything else is an LddpmError."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (scenes.RESOLUTION, scenes.RESOLUTION):
        raise LddpmError(f"{what} must be uint8 (N, 32, 32, 1) grey scene images, got {images.dtype} "
                         f"{tuple(images.shape)}; sample at resolution 32 with one channel")
    return images


def pair_slots(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves (N, 32, 16) of fashion-pairs canvases, each zero-padded to (N, 32, 32)."""
    images = as_canvases(images)
    pad = ((0, 0), (0, 0), (scenes.SMALL_OFFSET, scenes.SMALL_OFFSET))
    return np.pad(images[:, :, : scenes.HALF], pad), np.pad(images[:, :, scenes.HALF :], pad)


def extent(slots: np.ndarray, fg_threshold: int) -> np.ndarray:
    """The larger side (pixels) of the bounding box of pixels >= fg_threshold; 0 for an empty slot."""
    fg = np.asarray(slots) >= fg_threshold
    sides = []
    for axis in (2, 1):
        any_ = fg.any(axis=axis)
        n = any_.shape[1]
        first, last = any_.argmax(axis=1), n - 1 - any_[:, ::-1].argmax(axis=1)
        sides.append(np.where(any_.any(axis=1), last - first + 1, 0))
    return np.maximum(*sides)


def intensity(slots: np.ndarray, fg_threshold: int, feature: str = "top8") -> np.ndarray:
    """A brightness statistic of a slot: 'top8' (mean of its 8 brightest pixels), 'mean' or 'p90' (mean or
    90th percentile of the foreground pixels >= fg_threshold) or 'max'; 0 for a slot without foreground."""
    flat = np.asarray(slots).reshape(len(slots), -1).astype(np.float64)
    fg = flat >= fg_threshold
    count = fg.sum(axis=1)
    if feature == "mean":
        return np.where(count > 0, (flat * fg).sum(axis=1) / np.maximum(count, 1), 0.0)
    if feature == "max":
        return flat.max(axis=1) * (count > 0)
    if feature == "top8":
        return np.partition(flat, flat.shape[1] - 8, axis=1)[:, -8:].mean(axis=1) * (count > 0)
    if feature == "p90":
        ordered = -np.sort(-np.where(fg, flat, -1.0), axis=1)  # foreground values first, descending
        pos = np.clip(np.floor(0.1 * (count - 1)).astype(int), 0, None)
        return np.where(count > 0, np.take_along_axis(ordered, pos[:, None], axis=1)[:, 0], 0.0)
    raise LddpmError(f"unknown brightness feature {feature!r}; choose one of {', '.join(BRIGHTNESS_FEATURES)}")


def best_threshold(values: np.ndarray, positive: np.ndarray, tolerance: float = 0.0) -> tuple[float, float]:
    """A threshold t for `values > t` as a predictor of `positive`, and its accuracy.

    Candidates are the midpoints between consecutive distinct values; among those whose accuracy is within
    `tolerance` of the best, the one nearest the middle of their range is taken (a margin for images that
    differ a little from the calibration set).
    """
    values, positive = np.asarray(values, dtype=np.float64), np.asarray(positive, dtype=bool)
    cuts = np.unique(values)
    cands = np.concatenate([[cuts[0] - 1], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1]])
    pos_sorted, neg_sorted = np.sort(values[positive]), np.sort(values[~positive])
    # correct = negatives <= t + positives > t
    below_neg = np.searchsorted(neg_sorted, cands, side="right")
    correct = below_neg + len(pos_sorted) - np.searchsorted(pos_sorted, cands, side="right")
    acc = correct / len(values)
    good = cands[acc >= acc.max() - tolerance - 1e-12]
    t = float(good[np.argmin(np.abs(good - (good.min() + good.max()) / 2))])
    return t, float(acc[cands == t][0])


# ---------------------------------------------------------------------------------------------
# The checker


@dataclass
class SlotChecker:
    """A slot classifier (10 classes + empty) and the calibrated attribute thresholds."""

    model: SmallClassifier
    fg_threshold: int
    size_threshold: float
    brightness_feature: str
    brightness_threshold: float
    meta: dict = field(default_factory=dict)

    def classify(self, slots: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Most probable slot class (0..9, or EMPTY = 10) of uint8 slots (N, 32, 32)."""
        slots = np.asarray(slots)
        if len(slots) == 0:
            return np.zeros(0, np.int64)
        return class_probabilities(self.model, slots[..., None], batch_size=batch_size).argmax(axis=1)

    def size(self, slots: np.ndarray) -> np.ndarray:
        """True where the slot's item is large (bounding box side > size_threshold)."""
        return extent(slots, self.fg_threshold) > self.size_threshold

    def bright(self, slots: np.ndarray) -> np.ndarray:
        """True where the slot's item is bright (foreground statistic > brightness_threshold)."""
        return intensity(slots, self.fg_threshold, self.brightness_feature) > self.brightness_threshold


def _shift(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Translate each (H, W) image by (dy, dx) pixels with zero fill (vectorised by distinct shifts)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    for sy in np.unique(dy):
        for sx in np.unique(dx):
            sel = (dy == sy) & (dx == sx)
            if not sel.any():
                continue
            src = images[sel]
            dst = np.zeros_like(src)
            dst[:, max(sy, 0): h + min(sy, 0), max(sx, 0): w + min(sx, 0)] = \
                src[:, max(-sy, 0): h + min(-sy, 0), max(-sx, 0): w + min(-sx, 0)]
            out[sel] = dst
    return out


def slot_training_set(split: str, *, num: int | None = None, seed: int = 0, shift: int = 2, noise: float = 8.0,
                      root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Rendered 32x32 slots of `split` items: one random variant (large/small x bright/dark) per item, half of
    them shifted by up to +-`shift` px, a third with Gaussian pixel noise of std uniform in [0, `noise`], plus
    num/10 empty slots (half exact zeros, half faint noise).

    Returns {"slots" (M, 32, 32) uint8, "labels" (M,), "small", "dark" (bool, False for empties)}.
    """
    items, labels = scenes.source_items(split, root)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    index = subset_indices(len(items), len(items) if num is None else num, seed)
    n = len(index)
    variant = rng.permutation(n) % 4
    small, dark = variant // 2 == 1, variant % 2 == 1
    slots = scenes.render_text(items[index], small, dark)
    if shift:
        moved = rng.random(n) < 0.5
        dy = np.where(moved, rng.integers(-shift, shift + 1, n), 0)
        dx = np.where(moved, rng.integers(-shift, shift + 1, n), 0)
        slots = _shift(slots, dy, dx)
    if noise:
        noisy = rng.random(n) < 1 / 3
        sigma = rng.uniform(0, noise, n)[:, None, None]
        jitter = np.rint(slots[noisy] + rng.normal(size=(noisy.sum(),) + slots.shape[1:]) * sigma[noisy])
        slots[noisy] = np.clip(jitter, 0, 255).astype(np.uint8)
    n_empty = max(1, n // 10)
    empties = np.zeros((n_empty, scenes.RESOLUTION, scenes.RESOLUTION), np.uint8)
    noisy = rng.random(n_empty) < 0.5
    sigma = rng.uniform(2, 10, n_empty)[:, None, None]
    noise = np.abs(rng.normal(size=empties.shape)) * sigma
    empties[noisy] = np.clip(np.rint(noise[noisy]), 0, 255).astype(np.uint8)
    order = rng.permutation(n + n_empty)
    return {
        "slots": np.concatenate([slots, empties])[order],
        "labels": np.concatenate([labels[index], np.full(n_empty, EMPTY)])[order],
        "small": np.concatenate([small, np.zeros(n_empty, bool)])[order],
        "dark": np.concatenate([dark, np.zeros(n_empty, bool)])[order],
    }


def with_noise(canvases: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """uint8 canvases plus seeded Gaussian pixel noise of std `sigma` (0..255 scale), rounded and clipped."""
    if not sigma:
        return np.asarray(canvases)
    noise = np.random.default_rng([seed, int(sigma * 1000)]).normal(0.0, sigma, np.shape(canvases))
    return np.clip(np.rint(np.asarray(canvases, np.float64) + noise), 0, 255).astype(np.uint8)


def _text_variants(split: str, num: int | None, seed: int, stream: int, root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rendered fashion-text canvases of `split` items with balanced small/dark flags."""
    items, _ = scenes.source_items(split, root)
    index = subset_indices(len(items), len(items) if num is None else num, seed)
    variant = np.random.default_rng([seed, stream]).permutation(len(index)) % 4
    small, dark = variant // 2 == 1, variant % 2 == 1
    return scenes.render_text(items[index], small, dark), small, dark


def calibrate(split: str = "train", *, num: int | None = 10000, seed: int = 0,
              root: str | os.PathLike | None = None) -> dict:
    """Foreground, size and brightness thresholds that best separate rendered fashion-text scenes of `split`.

    The scenes are used clean and with pixel noise of std CALIBRATION_NOISE (a generator's images are not
    exact renders: a threshold fitted to clean renders alone sits at the edge of the dark items' range).
    The foreground threshold is the largest candidate whose size accuracy is within TOLERANCE of the best;
    the brightness feature is the most accurate of ROBUST_FEATURES at that threshold; thresholds by
    `best_threshold(..., TOLERANCE)`. Returns {"fg_threshold", "size_threshold", "size_accuracy",
    "brightness_feature", "brightness_threshold", "brightness_accuracy", "num", "noise", "candidates"}.
    """
    clean, small, dark = _text_variants(split, num, seed, 3, root)
    canvases = np.concatenate([with_noise(clean, s, seed) for s in CALIBRATION_NOISE])
    small, dark = np.tile(small, len(CALIBRATION_NOISE)), np.tile(dark, len(CALIBRATION_NOISE))
    size_acc = {fg: best_threshold(extent(canvases, fg), ~small)[1] for fg in FG_CANDIDATES}
    fg = max(f for f in FG_CANDIDATES if size_acc[f] >= max(size_acc.values()) - TOLERANCE)
    size_t, size_best = best_threshold(extent(canvases, fg), ~small, TOLERANCE)
    bright = {f: best_threshold(intensity(canvases, fg, f), ~dark, TOLERANCE) for f in BRIGHTNESS_FEATURES}
    feature = max(ROBUST_FEATURES, key=lambda f: bright[f][1])
    return {
        "fg_threshold": int(fg), "size_threshold": size_t, "size_accuracy": size_best,
        "brightness_feature": feature, "brightness_threshold": bright[feature][0],
        "brightness_accuracy": bright[feature][1], "num": int(len(clean)), "noise": list(CALIBRATION_NOISE),
        "candidates": {"size_accuracy_by_fg": {str(k): v for k, v in size_acc.items()},
                       "brightness_accuracy_by_feature": {k: v[1] for k, v in bright.items()}},
    }


def attribute_accuracy(checker: SlotChecker, split: str = "test", *, num: int | None = None, seed: int = 0,
                       noise: float = 0.0, root: str | os.PathLike | None = None) -> dict:
    """Accuracy of the checker's size and brightness readings on rendered fashion-text scenes of `split`
    (optionally with pixel noise of std `noise`)."""
    canvases, small, dark = _text_variants(split, num, seed, 4, root)
    canvases = with_noise(canvases, noise, seed + 1)
    return {"size_accuracy": float((checker.size(canvases) == ~small).mean()),
            "brightness_accuracy": float((checker.bright(canvases) == ~dark).mean()), "num": int(len(canvases)),
            "noise": noise}


def train_checker(
    *, num_train: int | None = None, num_test: int | None = None, epochs: float = 1.5, width: int = 16,
    seed: int = 0, root: str | os.PathLike | None = None, progress: bool = False,
) -> SlotChecker:
    """Train the slot classifier on rendered slots of the Fashion-MNIST train split and calibrate thresholds.

    num_train/num_test limit the items used (None = all 60,000 / 10,000). The metadata records the slot
    accuracy on rendered test slots overall and per variant, and the attribute accuracies on test scenes.
    """
    start = time.perf_counter()
    train = slot_training_set("train", num=num_train, seed=seed, root=root)
    test = slot_training_set("test", num=num_test, seed=seed, shift=0, noise=0, root=root)
    model, acc = train_classifier(
        train["slots"][..., None], train["labels"], test["slots"][..., None], test["labels"],
        num_classes=len(SLOT_CLASSES), epochs=epochs, width=width, seed=seed, progress=progress,
    )
    trained = time.perf_counter() - start
    cal = calibrate("train", seed=seed, root=root, num=min(num_train or 10000, 10000))  # x3 with noise
    checker = SlotChecker(model, cal["fg_threshold"], cal["size_threshold"], cal["brightness_feature"],
                          cal["brightness_threshold"])
    pred = checker.classify(test["slots"])
    variants = {}
    is_item = test["labels"] != EMPTY
    for name, sel in (("large_bright", is_item & ~test["small"] & ~test["dark"]),
                      ("large_dark", is_item & ~test["small"] & test["dark"]),
                      ("small_bright", is_item & test["small"] & ~test["dark"]),
                      ("small_dark", is_item & test["small"] & test["dark"]),
                      ("empty", ~is_item)):
        variants[name] = float((pred[sel] == test["labels"][sel]).mean()) if sel.any() else None
    checker.meta = {
        "kind": "lddpm scene slot checker", "checker_version": CHECKER_VERSION, "slot_classes": list(SLOT_CLASSES),
        "test_slot_accuracy": acc, "test_item_accuracy": float((pred[is_item] == test["labels"][is_item]).mean()),
        "test_slot_accuracy_by_variant": variants,
        "calibration": {k: v for k, v in cal.items()},
        "test_attributes": attribute_accuracy(checker, "test", num=num_test, seed=seed, root=root),
        "test_attributes_noisy": [attribute_accuracy(checker, "test", num=num_test, seed=seed, noise=s, root=root)
                                  for s in (4, 8)],
        "num_train_slots": int(len(train["labels"])), "num_test_slots": int(len(test["labels"])),
        "epochs": epochs, "width": width, "seed": seed, "train_seconds": round(trained, 1),
        "lddpm_version": __version__,
    }
    return checker


def default_checker_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/checkers/fashion-scenes-v<CHECKER_VERSION>`, cache = $LDDPM_CACHE or ~/.cache/lddpm."""
    return Path(cache_dir or default_cache_dir()) / "checkers" / f"fashion-scenes-v{CHECKER_VERSION}"


def save_checker(checker: SlotChecker, folder: str | os.PathLike) -> Path:
    """Write the checker as model.safetensors + classifier.json (thresholds in it), atomically as a folder."""
    meta = {**checker.meta, "fg_threshold": checker.fg_threshold, "size_threshold": checker.size_threshold,
            "brightness_feature": checker.brightness_feature, "brightness_threshold": checker.brightness_threshold}
    with atomic_dir(folder) as tmp:
        save_classifier(checker.model, tmp, meta)
    return Path(folder)


def load_checker(
    folder: str | os.PathLike | None = None, *, train_if_missing: bool = True, root: str | os.PathLike | None = None,
    progress: bool = True,
) -> SlotChecker:
    """Load the checker from `folder` (default: `default_checker_dir()`); train and save it there if absent."""
    folder = Path(folder) if folder is not None else default_checker_dir()
    if not folder.exists():
        if not train_if_missing:
            raise LddpmError(f"no scene checker in {str(folder)!r}; train one with "
                             "lddpm.metrics.faithfulness.load_checker() (about 2 minutes on one core)")
        save_checker(train_checker(root=root, progress=progress), folder)
    model, meta = load_classifier(folder)
    if meta.get("checker_version") != CHECKER_VERSION or "fg_threshold" not in meta:
        raise LddpmError(f"{str(folder)!r} holds no scene checker of version {CHECKER_VERSION}; delete the folder "
                         "and load again to retrain it")
    return SlotChecker(model, int(meta["fg_threshold"]), float(meta["size_threshold"]), str(meta["brightness_feature"]),
                       float(meta["brightness_threshold"]), meta)


# ---------------------------------------------------------------------------------------------
# Scoring


def _layout(records: list[dict]) -> str:
    kinds = set()
    for n, record in enumerate(records):
        try:
            slots = {o["slot"] for o in record["objects"]}
            for o in record["objects"]:
                if not 0 <= int(o["class"]) < 10:
                    raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LddpmError(f"prompt record {n} has no valid `objects` list (slot, class 0..9, size, brightness); "
                             "write prompt sets with lddpm.data.scenes.write_prompt_set") from None
        if slots == {"center"}:
            kinds.add("fashion-text")
        elif slots and slots <= {"left", "right"} and len(record["objects"]) == len(slots):
            kinds.add("fashion-pairs")
        else:
            raise LddpmError(f"prompt record {n} has slots {sorted(slots)}; expected one 'center' object "
                             "(fashion-text) or one object per 'left'/'right' slot (fashion-pairs)")
    if len(kinds) != 1:
        raise LddpmError("the prompt records mix fashion-text and fashion-pairs scenes (or are empty); "
                         "score each set separately")
    return kinds.pop()


def check_prompts(images: np.ndarray, records: list[dict], checker: SlotChecker) -> dict[str, np.ndarray]:
    """Per-image clause results (bool arrays, N each) of images against their prompt records.

    fashion-text: class, size, brightness, all. fashion-pairs: left_ok, right_ok, all (both slots right,
    an unnamed slot must be empty), swap (pair prompts: both items on the wrong sides), presence (every
    named item in some slot), empty_ok (the unnamed slot of a one-side prompt is empty), plus the predicted
    slot classes pred_left/pred_right (EMPTY = 10).
    """
    images = as_canvases(images)
    if len(images) != len(records):
        raise LddpmError(f"{len(images)} images for {len(records)} prompt records; give one record per image")
    if _layout(records) == "fashion-text":
        obj = [r["objects"][0] for r in records]
        cls = np.array([o["class"] for o in obj])
        large = np.array([o.get("size", "large") == "large" for o in obj])
        bright = np.array([o.get("brightness", "bright") == "bright" for o in obj])
        pred = checker.classify(images)
        out = {"class": pred == cls, "size": checker.size(images) == large,
               "brightness": checker.bright(images) == bright, "pred": pred}
        out["all"] = out["class"] & out["size"] & out["brightness"]
        return out
    expected = np.full((len(records), 2), EMPTY)
    for n, record in enumerate(records):
        for o in record["objects"]:
            expected[n, 0 if o["slot"] == "left" else 1] = int(o["class"])
    left, right = pair_slots(images)
    pred = np.stack([checker.classify(left), checker.classify(right)], axis=1)
    ok = pred == expected
    named = expected != EMPTY
    distinct = named.all(axis=1) & (expected[:, 0] != expected[:, 1])
    swap = distinct & (pred[:, 0] == expected[:, 1]) & (pred[:, 1] == expected[:, 0])
    presence = np.array([_contains(list(p), [c for c in e if c != EMPTY]) for p, e in zip(pred, expected)])
    one_side = named.sum(axis=1) == 1
    empty_ok = one_side & (np.where(named[:, 0], pred[:, 1], pred[:, 0]) == EMPTY)
    return {"left_ok": ok[:, 0], "right_ok": ok[:, 1], "all": ok.all(axis=1), "swap": swap, "presence": presence,
            "empty_ok": empty_ok, "pred_left": pred[:, 0], "pred_right": pred[:, 1]}


def _contains(found: list[int], wanted: list[int]) -> bool:
    """True if the multiset `wanted` is contained in `found`."""
    found = list(found)
    for c in wanted:
        if c not in found:
            return False
        found.remove(c)
    return True


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def score_prompts(
    images: np.ndarray, records: list[dict], *, checker: SlotChecker | None = None,
) -> dict:
    """Prompt-faithfulness scores of generated images (uint8 (N, 32, 32, 1)) against their prompt records.

    fashion-text: {"task", "num", "class_accuracy", "size_accuracy", "brightness_accuracy", "all_accuracy",
    "seen": {...}, "heldout": {...}} (seen / held-out phrasing). fashion-pairs: {"task", "num",
    "slot_accuracy", "pair_accuracy" (both slots right), "swap_rate" (of pair prompts), "presence",
    "empty_slot_accuracy" (of one-side prompts), "by_tag": {tag: {num, accuracy}}, "geneval_overall" (mean
    over tags of the fraction of correct images), "seen"/"heldout": the pair-prompt metrics split by
    held-out pair}. checker=None loads (or first trains) the cached checker.
    """
    checker = checker or load_checker()
    res = check_prompts(images, records, checker)
    if "class" in res:
        held = np.array([bool(r.get("heldout_phrase", False)) for r in records])

        def text_scores(sel: np.ndarray) -> dict:
            return {"num": int(sel.sum()), "class_accuracy": _mean(res["class"][sel]),
                    "size_accuracy": _mean(res["size"][sel]), "brightness_accuracy": _mean(res["brightness"][sel]),
                    "all_accuracy": _mean(res["all"][sel])}

        every = np.ones(len(records), bool)
        return {"task": "fashion-text", **text_scores(every), "seen": text_scores(~held), "heldout": text_scores(held)}
    tags = np.array([str(r.get("tag", "")) for r in records])
    held = np.array([bool(r.get("heldout_pair", False)) for r in records])
    is_pair = tags == "pair"

    def pair_scores(sel: np.ndarray) -> dict:
        slots_ok = np.concatenate([res["left_ok"][sel], res["right_ok"][sel]])
        return {"num": int(sel.sum()), "slot_accuracy": _mean(slots_ok),
                "pair_accuracy": _mean(res["all"][sel]), "swap_rate": _mean(res["swap"][sel & is_pair]),
                "presence": _mean(res["presence"][sel])}

    every = np.ones(len(records), bool)
    one_side = tags == "one_side"
    by_tag = {t: {"num": int((tags == t).sum()), "accuracy": _mean(res["all"][tags == t])} for t in sorted(set(tags))}
    return {
        "task": "fashion-pairs", **pair_scores(every), "empty_slot_accuracy": _mean(res["empty_ok"][one_side]),
        "by_tag": by_tag, "geneval_overall": _mean(np.array([v["accuracy"] for v in by_tag.values()])),
        "seen": pair_scores(is_pair & ~held), "heldout": pair_scores(is_pair & held),
    }


def render_records(records: list[dict], *, split: str = "test", seed: int = 0,
                   root: str | os.PathLike | None = None) -> np.ndarray:
    """Real scenes (N, 32, 32, 1) uint8 for prompt records: each named object drawn from a seeded random item
    of its class in `split` (test by default), rendered as the record says."""
    items, labels = scenes.source_items(split, root)
    members = [np.flatnonzero(labels == c) for c in range(10)]
    rng = np.random.default_rng([seed, 5])
    layout = _layout(records)

    def pick(cls: int) -> int:
        return int(members[cls][rng.integers(len(members[cls]))])

    if layout == "fashion-text":
        obj = [r["objects"][0] for r in records]
        index = np.array([pick(o["class"]) for o in obj])
        small = np.array([o.get("size") == "small" for o in obj])
        dark = np.array([o.get("brightness") == "dark" for o in obj])
        return scenes.render_text(items[index], small, dark)[..., None]
    n = len(records)
    left, right = np.zeros(n, np.int64), np.zeros(n, np.int64)
    has_left, has_right = np.zeros(n, bool), np.zeros(n, bool)
    for k, record in enumerate(records):
        for o in record["objects"]:
            if o["slot"] == "left":
                left[k], has_left[k] = pick(o["class"]), True
            else:
                right[k], has_right[k] = pick(o["class"]), True
    return scenes.render_pairs(items[left], items[right], has_left, has_right)[..., None]


def ceiling(name: str, records: list[dict], *, checker: SlotChecker | None = None, seed: int = 0,
            root: str | os.PathLike | None = None) -> dict:
    """The checker's score on real rendered test scenes for the same prompts (the best a generator can expect)."""
    images = render_records(records, split="test", seed=seed, root=root)
    scores = score_prompts(images, records, checker=checker)
    if scores["task"] != name:
        raise LddpmError(f"the prompt records describe {scores['task']} scenes, not {name!r}")
    return scores
