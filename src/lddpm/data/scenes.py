"""Synthetic text-to-image benchmark sets rendered from the real Fashion-MNIST ("fashion-text", "fashion-pairs").

Every caption is derived from a structured scene, so a per-slot classifier can check every clause of a
prompt exactly (the GenEval idea, Ghosh et al. 2023, with a slot classifier in place of the detector;
see lddpm.metrics.faithfulness). Train items render the split `train`, test items the split `test`.

fashion-text (design D1): one item on a 32x32 canvas, captions from the grammar
    CAPTION := TEMPLATE(NP),  NP := [ART] [SIZE] [BRIGHT] NOUN
with SIZE in {small, large, ""} (small = the item area-resampled 28 -> 16 px, about 0.57x, centred; large =
as is, 28x28 zero-padded to 32x32 as `lddpm prepare fashion-mnist` does), BRIGHT in {dark, bright, ""}
(dark = intensity x 0.5) and several synonyms per class. An omitted word means the default (large,
bright). One synonym per class (`HELDOUT_SYNONYMS`) and one template (`HELDOUT_TEMPLATE`) never occur in
the train split; in the test split half the images (seeded) carry only held-out phrasings.

fashion-pairs (design D2): the 32x32 canvas is split into a left and a right 16-px-wide half; each half is
empty or holds one item area-resampled to 16x16 and vertically centred (rows 8..23). Tags: "pair" (two
different classes, four phrasings: "a bag on the left and a sneaker on the right", "a sneaker on the
right and a bag on the left", "a bag to the left of a sneaker", "a sneaker to the right of a bag"),
"two_same" ("two bags", ...), "one_side" ("a bag on the left", other half empty). `HELDOUT_PAIRS`: the 20
ordered class pairs (a, b) with (b - a) mod 10 in {3, 7}, i.e. the 10 unordered pairs {c, c+3} in both
orders, never drawn together in the train split in any phrasing; each class keeps 7 partners on each
side in training. Pair scenes use each class's first (canonical) noun.

Rendering is integer-exact (area weights in quarter pixels, float64 sums of integers, integer rounding),
so the same seed gives byte-identical images on any machine.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
import struct
from pathlib import Path

import numpy as np

from lddpm.data.readers import FASHION_MNIST_CLASSES, read_mnist_like
from lddpm.errors import LddpmError
from lddpm.io import atomic_dir, write_text
from lddpm.seeding import subset_indices

SCENE_SETS = ("fashion-text", "fashion-pairs")
SPLITS = ("train", "test")
CLASS_NAMES = FASHION_MNIST_CLASSES
RESOLUTION = 32
ITEM = 28  # Fashion-MNIST item size
SMALL = 16  # a small fashion-text item and a fashion-pairs slot item: 28 -> 16 px (scale 4/7)
LARGE_OFFSET = (RESOLUTION - ITEM) // 2  # 2: the zero padding of 28 -> 32
SMALL_OFFSET = (RESOLUTION - SMALL) // 2  # 8: a 16-px item centred in 32 px
HALF = RESOLUTION // 2  # width of a fashion-pairs slot
CAPTIONS_PER_IMAGE = 3  # fashion-text paraphrases per image
FORMAT_VERSION = 1

# Synonyms per class; the first is the canonical noun (used by fashion-pairs).
SYNONYMS = (
    ("t-shirt", "top", "tee"),
    ("trousers", "pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock"),
    ("coat", "jacket"),
    ("sandal", "flip-flop"),
    ("shirt", "button-up shirt"),
    ("sneaker", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)
HELDOUT_SYNONYMS = ("tee", "pants", "jumper", "frock", "jacket", "flip-flop", "button-up shirt", "trainer",
                    "handbag", "boot")
PLURALS = ("t-shirts", "pairs of trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers",
           "bags", "ankle boots")
PAIR_NOUNS = ("pants", "trousers")  # pluralia tantum: "a pair of trousers"

# fashion-text templates over the noun phrase: {np} has an article, {bare} has none.
TEXT_TEMPLATES = ("{np}", "{bare}", "a photo of {np}", "{np} on a black background", "a picture of {np}")
HELDOUT_TEMPLATE = 4  # "a picture of ..." never occurs in training captions

HELDOUT_OFFSETS = (3, 7)
HELDOUT_PAIRS = tuple((a, (a + k) % 10) for a in range(10) for k in HELDOUT_OFFSETS)
ALL_PAIRS = tuple((a, b) for a in range(10) for b in range(10) if a != b)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
PAIR_TAG_SHARES = {"pair": 0.7, "two_same": 0.1, "one_side": 0.2}  # of the scenes of a fashion-pairs split


# ---------------------------------------------------------------------------------------------
# Phrasing


@functools.lru_cache(maxsize=None)
def noun_phrase(noun: str, adjectives: tuple[str, ...] = (), article: bool = True) -> str:
    """'a small dark jumper', 'an ankle boot', 'a pair of dark trousers'; article=False drops the article."""
    body = " ".join([*(a for a in adjectives if a), noun])
    if not article:
        return body
    if noun in PAIR_NOUNS:
        return "a pair of " + body
    return ("an " if body[0] in "aeiou" else "a ") + body


def text_caption(template: int, noun: str, size_word: str, brightness_word: str) -> str:
    """One fashion-text caption: TEXT_TEMPLATES[template] over [ART] [SIZE] [BRIGHT] NOUN."""
    adjectives = (size_word, brightness_word)
    return TEXT_TEMPLATES[template].format(np=noun_phrase(noun, adjectives), bare=noun_phrase(noun, adjectives, False))


@functools.lru_cache(maxsize=None)
def text_captions(cls: int, size: str, brightness: str, heldout: bool) -> tuple[str, ...]:
    """Every caption of a fashion-text scene: with heldout=False those without a held-out synonym or template,
    with heldout=True those with at least one."""
    out = []
    for t in range(len(TEXT_TEMPLATES)):
        for noun in SYNONYMS[cls]:
            for size_word in (("small",) if size == "small" else ("large", "")):
                for brightness_word in (("dark",) if brightness == "dark" else ("bright", "")):
                    uses_heldout = t == HELDOUT_TEMPLATE or noun == HELDOUT_SYNONYMS[cls]
                    if uses_heldout == heldout:
                        out.append(text_caption(t, noun, size_word, brightness_word))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def pair_captions(left: int, right: int) -> tuple[str, ...]:
    """The four phrasings of `left` on the left and `right` (another class) on the right."""
    a, b = noun_phrase(SYNONYMS[left][0]), noun_phrase(SYNONYMS[right][0])
    return (f"{a} on the left and {b} on the right", f"{b} on the right and {a} on the left",
            f"{a} to the left of {b}", f"{b} to the right of {a}")


@functools.lru_cache(maxsize=None)
def two_same_captions(cls: int) -> tuple[str, ...]:
    """Phrasings of one class in both halves."""
    a = noun_phrase(SYNONYMS[cls][0])
    return (f"two {PLURALS[cls]}", f"{a} on the left and {a} on the right", f"two {PLURALS[cls]} side by side")


@functools.lru_cache(maxsize=None)
def one_side_captions(cls: int, side: str) -> tuple[str, ...]:
    """Phrasings of one item in the `side` half with the other half empty."""
    a, other = noun_phrase(SYNONYMS[cls][0]), "right" if side == "left" else "left"
    return (f"{a} on the {side}", f"{a} on the {side} side", f"{a} on the {side} and nothing on the {other}")


def scene_object(slot: str, cls: int, size: str = "large", brightness: str = "bright") -> dict:
    """One entry of a record's `objects` list (the contract's schema)."""
    return {"slot": slot, "class": int(cls), "class_name": CLASS_NAMES[cls], "size": size, "brightness": brightness}


# ---------------------------------------------------------------------------------------------
# Rendering (vectorised, integer-exact)


def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) integer overlap lengths of an area (box) resample src -> dst, in units of 1/dst input pixels.

    Output pixel j covers [j*src, (j+1)*src) and input pixel i covers [i*dst, (i+1)*dst) in those units, so
    each row sums to src and out = W @ x @ W.T / src**2 is the exact area average.
    """
    j = np.arange(dst)[:, None]
    i = np.arange(src)[None, :]
    lo = np.maximum(j * src, i * dst)
    hi = np.minimum((j + 1) * src, (i + 1) * dst)
    return np.clip(hi - lo, 0, None).astype(np.float64)


def shrink(items: np.ndarray, size: int = SMALL) -> np.ndarray:
    """Area-resample uint8 items (N, 28, 28) to (N, size, size), rounded half up (exact integer arithmetic)."""
    items = np.asarray(items)
    n = items.shape[-1]
    w = _area_weights(n, size)
    x = items.reshape(-1, n).astype(np.float64) @ w.T  # (N*n, size): two plain GEMMs, sums of integers
    x = x.reshape(-1, n, size).transpose(0, 2, 1).reshape(-1, n) @ w.T  # (N*size, size), transposed
    sums = np.rint(x.reshape(items.shape[:-2] + (size, size))).swapaxes(-1, -2).astype(np.int64)  # exact
    den = n * n
    return ((2 * sums + den) // (2 * den)).astype(np.uint8)


def darken(pixels: np.ndarray, dark: np.ndarray | bool) -> np.ndarray:
    """Halve the intensity where `dark` (broadcast over pixels), rounding half up; others unchanged."""
    pixels = np.asarray(pixels)
    dark = np.asarray(dark, dtype=bool)
    dark = dark.reshape(dark.shape + (1,) * (pixels.ndim - dark.ndim))
    return np.where(dark, (pixels.astype(np.uint16) + 1) // 2, pixels).astype(np.uint8)


def render_text(items: np.ndarray, small: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """fashion-text canvases (N, 32, 32) uint8 from items (N, 28, 28) and per-item small/dark flags."""
    items = np.asarray(items, dtype=np.uint8)
    small, dark = np.asarray(small, dtype=bool), np.asarray(dark, dtype=bool)
    out = np.zeros((len(items), RESOLUTION, RESOLUTION), np.uint8)
    big = ~small
    lo, so = LARGE_OFFSET, SMALL_OFFSET
    out[big, lo:lo + ITEM, lo:lo + ITEM] = darken(items[big], dark[big])
    if small.any():
        out[small, so:so + SMALL, so:so + SMALL] = darken(shrink(items[small]), dark[small])
    return out


def render_pairs(left: np.ndarray, right: np.ndarray, has_left: np.ndarray, has_right: np.ndarray) -> np.ndarray:
    """fashion-pairs canvases (N, 32, 32) uint8: left/right items (N, 28, 28) shrunk to 16x16, vertically
    centred in their half; a half whose has_* flag is False stays empty (its item is ignored)."""
    has_left, has_right = np.asarray(has_left, dtype=bool), np.asarray(has_right, dtype=bool)
    out = np.zeros((len(has_left), RESOLUTION, RESOLUTION), np.uint8)
    so = SMALL_OFFSET
    if has_left.any():
        out[has_left, so:so + SMALL, 0:HALF] = shrink(np.asarray(left)[has_left])
    if has_right.any():
        out[has_right, so:so + SMALL, HALF:] = shrink(np.asarray(right)[has_right])
    return out


# ---------------------------------------------------------------------------------------------
# Source items


@functools.lru_cache(maxsize=4)
def _source(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    raw = read_mnist_like("fashion-mnist", split, root)
    images, labels = np.asarray(raw.images), raw.labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels, raw.sources[0]["sha256"]


def source_items(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real Fashion-MNIST items (N, 28, 28) uint8 and labels of `split` (read once per process)."""
    _check_split(split)
    images, labels, _ = _source(split, None if root is None else str(root))
    return images, labels


def _check_name(name: str) -> str:
    if name not in SCENE_SETS:
        raise LddpmError(f"unknown scene set {name!r}; choose one of {', '.join(SCENE_SETS)}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise LddpmError(f"unknown split {split!r} for a scene set; choose 'train' or 'test'")
    return split


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from the parts (strings hashed with crc32) so each stream is independent."""
    return np.random.default_rng([zlib.crc32(str(p).encode()) for p in parts])


def _balanced(rng: np.random.Generator, num: int, shares: dict[str, float]) -> np.ndarray:
    """`num` labels with the given shares (rounded), in a seeded random order."""
    names = list(shares)
    counts = [int(round(shares[k] * num)) for k in names[:-1]]
    counts.append(num - sum(counts))
    return rng.permutation(np.repeat(np.array(names, dtype=object), counts))


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(10)]


# ---------------------------------------------------------------------------------------------
# Scene sets


def render_scenes(
    name: str, split: str, *, num: int | None = None, seed: int = 0, root: str | os.PathLike | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Render a scene set in memory: (images (N, 32, 32) uint8, metadata records without `file_name`).

    num=None renders one scene per source item (60,000 train, 10,000 test); a smaller num takes a seeded
    subset of the items, a larger one cycles through them. A pure function of (name, split, num, seed).
    """
    _check_name(name), _check_split(split)
    items, labels = source_items(split, root)
    total = len(items)
    num = total if num is None else int(num)
    if num < 1:
        raise LddpmError(f"the number of scenes must be at least 1, got {num}")
    index = np.arange(num) % total if num >= total else subset_indices(total, num, seed)
    if name == "fashion-text":
        return _render_text_set(items, labels, index, split, seed)
    return _render_pairs_set(items, labels, index, split, seed)


def _render_text_set(items, labels, index, split, seed):
    num = len(index)
    rng = _rng("fashion-text", split, seed)
    combo = rng.permutation(num) % 4  # balanced size x brightness
    small, dark = combo // 2 == 1, combo % 2 == 1
    heldout = (rng.permutation(num) % 2 == 1) if split == "test" else np.zeros(num, bool)
    images = render_text(items[index], small, dark)
    classes = labels[index]
    pools = [text_captions(int(c), "small" if s else "large", "dark" if d else "bright", bool(h))
             for c, s, d, h in zip(classes, small, dark, heldout)]
    # CAPTIONS_PER_IMAGE distinct captions per image: the smallest random keys among the pool's entries
    sizes = np.array([len(p) for p in pools])
    keys = rng.random((num, sizes.max()))
    keys[np.arange(sizes.max())[None, :] >= sizes[:, None]] = np.inf
    picks = np.argsort(keys, axis=1, kind="stable")[:, :CAPTIONS_PER_IMAGE]
    records = []
    for k in range(num):
        cls = int(classes[k])
        size, brightness = ("small" if small[k] else "large"), ("dark" if dark[k] else "bright")
        pool = pools[k]
        pick = picks[k, : min(CAPTIONS_PER_IMAGE, len(pool))]
        records.append({
            "text": [pool[i] for i in pick], "objects": [scene_object("center", cls, size, brightness)],
            "tag": "single", "heldout_phrase": bool(heldout[k]), "heldout_pair": False,
        })
    return images, records


def _render_pairs_set(items, labels, index, split, seed):
    num = len(index)
    rng = _rng("fashion-pairs", split, seed)
    members = _by_class(labels)
    allowed = SEEN_PAIRS if split == "train" else ALL_PAIRS
    tags = _balanced(rng, num, PAIR_TAG_SHARES)
    primary_left = rng.random(num) < 0.5  # which side the source item goes to
    u_class, u_item = rng.random(num), rng.random(num)  # partner class and partner item draws
    # partners[side][c]: the classes allowed opposite class c when c is on `side`
    partners = {True: [[b for a, b in allowed if a == c] for c in range(10)],
                False: [[a for a, b in allowed if b == c] for c in range(10)]}
    classes = labels[index]
    left_idx, right_idx = index.copy(), index.copy()
    has_left = (tags != "one_side") | primary_left
    has_right = (tags != "one_side") | ~primary_left
    records = []
    for k in range(num):
        cls, tag, first = int(classes[k]), str(tags[k]), bool(primary_left[k])
        if tag == "one_side":
            side = "left" if first else "right"
            records.append({"text": list(one_side_captions(cls, side)), "objects": [scene_object(side, cls)],
                            "tag": tag, "heldout_phrase": False, "heldout_pair": False})
            continue
        options = [cls] if tag == "two_same" else partners[first][cls]
        other = options[int(u_class[k] * len(options))]
        partner = int(members[other][int(u_item[k] * len(members[other]))])
        if first:
            right_idx[k], pair = partner, (cls, other)
        else:
            left_idx[k], pair = partner, (other, cls)
        text = list(two_same_captions(cls) if tag == "two_same" else pair_captions(*pair))
        records.append({"text": text, "objects": [scene_object("left", pair[0]), scene_object("right", pair[1])],
                        "tag": tag, "heldout_phrase": False, "heldout_pair": pair in HELDOUT_PAIRS})
    images = render_pairs(items[left_idx], items[right_idx], has_left, has_right)
    return images, records


def metadata_line(file_name: str, record: dict) -> str:
    """One metadata.jsonl line in the contract's key order."""
    keys = ("text", "objects", "tag", "heldout_phrase", "heldout_pair")
    return json.dumps({"file_name": file_name, **{k: record[k] for k in keys}}, ensure_ascii=False)


def png_bytes(image: np.ndarray) -> bytes:
    """A minimal deterministic 8-bit greyscale PNG of a (H, W) uint8 image (zlib level 9, filter 0)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1).tobytes()  # filter byte 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def prepare_scenes(
    name: str, split: str, out_dir: str | os.PathLike, *, num: int | None = None, seed: int = 0,
    root: str | os.PathLike | None = None,
) -> Path:
    """Render a scene set and write it as an image folder: NNNNNN.png + metadata.jsonl (+ scenes.json).

    The folder is built beside `out_dir` and moved into place when complete (an existing scene folder is
    replaced; any other non-empty folder is refused). Byte-identical for the same arguments. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    ours = (out_dir / "scenes.json").is_file()
    if out_dir.exists() and (not out_dir.is_dir() or (not ours and any(out_dir.iterdir()))):
        raise LddpmError(f"{out_dir} exists and is not a scene folder written by lddpm (no scenes.json); "
                         "choose a new or empty folder")
    images, records = render_scenes(name, split, num=num, seed=seed, root=root)
    width = max(6, len(str(len(images) - 1)))
    with atomic_dir(out_dir) as tmp:
        lines = []
        for k, (image, record) in enumerate(zip(images, records)):
            file_name = f"{k:0{width}d}.png"
            (tmp / file_name).write_bytes(png_bytes(image))
            lines.append(metadata_line(file_name, record))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _, _, source_sha = _source(split, None if root is None else str(root))
        info = {
            "name": name, "split": split, "num": len(images), "seed": seed, "format_version": FORMAT_VERSION,
            "resolution": RESOLUTION, "source_images_sha256": source_sha, "tags": _counts(r["tag"] for r in records),
            "heldout_phrase": sum(r["heldout_phrase"] for r in records),
            "heldout_pair": sum(r["heldout_pair"] for r in records),
        }
        (tmp / "scenes.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Evaluation prompt sets

HELDOUT_CHOICES = ("both", "seen", "only")


def prompt_set(name: str, *, num: int, heldout: str = "both", seed: int = 0) -> list[dict]:
    """Evaluation prompts {prompt, objects, tag, heldout_phrase, heldout_pair}, balanced over classes/pairs.

    heldout: "both" (half the prompts with held-out phrasings / pairs), "seen" (none), "only" (only held-out
    ones; for fashion-pairs only the "pair" tag). fashion-text cycles over the 40 class x size x brightness
    combinations; fashion-pairs gives 60 % "pair" (cycling over the seen and the held-out ordered pairs and the
    four phrasings), 20 % "two_same" and 20 % "one_side" prompts (cycling over classes and sides).
    """
    _check_name(name)
    if heldout not in HELDOUT_CHOICES:
        raise LddpmError(f"unknown heldout choice {heldout!r}; choose one of {', '.join(HELDOUT_CHOICES)}")
    if int(num) < 1:
        raise LddpmError(f"the number of prompts must be at least 1, got {num}")
    rng = _rng("prompts", name, heldout, seed)
    return _text_prompts(rng, int(num), heldout) if name == "fashion-text" else _pair_prompts(rng, int(num), heldout)


def _cycle(rng: np.random.Generator, options: list, num: int) -> list:
    """`num` options: whole shuffled passes over `options`, so each occurs equally often (+-1)."""
    out = []
    while len(out) < num:
        out += [options[i] for i in rng.permutation(len(options))]
    return out[:num]


def _text_prompts(rng, num, heldout):
    combos = [(c, s, b) for c in range(10) for s in ("large", "small") for b in ("bright", "dark")]
    chosen = _cycle(rng, list(range(len(combos))), num)
    out = []
    for k, j in enumerate(chosen):
        # "both": in every pass half the combinations get a held-out phrasing, the other half in the next pass
        flag = {"seen": False, "only": True, "both": (j + k // len(combos)) % 2 == 1}[heldout]
        cls, size, brightness = combos[j]
        pool = text_captions(cls, size, brightness, flag)
        out.append({"prompt": pool[rng.integers(len(pool))], "objects": [scene_object("center", cls, size, brightness)],
                    "tag": "single", "heldout_phrase": flag, "heldout_pair": False})
    return out


def _pair_prompts(rng, num, heldout):
    if heldout == "only":
        counts = {"pair": num, "two_same": 0, "one_side": 0}
    else:
        n_pair = int(round(0.6 * num))
        n_same = int(round(0.2 * num))
        counts = {"pair": n_pair, "two_same": n_same, "one_side": num - n_pair - n_same}
    out = []
    n_pair = counts["pair"]
    n_held = {"seen": 0, "only": n_pair, "both": n_pair // 2}[heldout]
    pairs = _cycle(rng, list(SEEN_PAIRS), n_pair - n_held) + _cycle(rng, list(HELDOUT_PAIRS), n_held)
    forms = _cycle(rng, [0, 1, 2, 3], n_pair)
    for (a, b), form in zip(pairs, forms):
        out.append({"prompt": pair_captions(a, b)[form], "objects": [scene_object("left", a), scene_object("right", b)],
                    "tag": "pair", "heldout_phrase": False, "heldout_pair": (a, b) in HELDOUT_PAIRS})
    for cls in _cycle(rng, list(range(10)), counts["two_same"]):
        text = two_same_captions(cls)
        out.append({"prompt": text[rng.integers(len(text))],
                    "objects": [scene_object("left", cls), scene_object("right", cls)],
                    "tag": "two_same", "heldout_phrase": False, "heldout_pair": False})
    for cls, side in _cycle(rng, [(c, s) for c in range(10) for s in ("left", "right")], counts["one_side"]):
        text = one_side_captions(cls, side)
        out.append({"prompt": text[rng.integers(len(text))], "objects": [scene_object(side, cls)],
                    "tag": "one_side", "heldout_phrase": False, "heldout_pair": False})
    return [out[i] for i in rng.permutation(len(out))]


def write_prompt_set(
    name: str, out_path: str | os.PathLike, *, num: int, heldout: str = "both", seed: int = 0
) -> Path:
    """Write `prompt_set(name, num=num, heldout=heldout, seed=seed)` as JSONL (atomically); returns the path."""
    records = prompt_set(name, num=num, heldout=heldout, seed=seed)
    keys = ("prompt", "objects", "tag", "heldout_phrase", "heldout_pair")
    text = "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in records)
    return write_text(out_path, text)


def read_prompt_set(path: str | os.PathLike) -> list[dict]:
    """Read a prompt-set JSONL (or a scene folder's metadata.jsonl: `text` lists become one prompt each)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LddpmError(f"cannot read prompt set {path}: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            objects = record["objects"]
        except (ValueError, KeyError, TypeError):
            raise LddpmError(f"{path} line {n} is not a prompt record (JSON with `prompt` and `objects`); "
                             "write it with `write_prompt_set`") from None
        if "prompt" in record:
            out.append(record)
        else:
            texts = record.get("text")
            for t in [texts] if isinstance(texts, str) else list(texts or []):
                out.append({**{k: v for k, v in record.items() if k not in ("text", "file_name")}, "prompt": t,
                            "objects": objects})
    return out
