"""Synthetic scene sets (lddpm.data.scenes) and the prompt-faithfulness checker (lddpm.metrics.faithfulness).

Uses the real Fashion-MNIST files (Debian dataset-fashion-mnist); skipped where they are absent.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from lddpm.data import scenes as S
from lddpm.data.readers import FASHION_MNIST_DEFAULT_ROOT
from lddpm.errors import LddpmError

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST files not installed")

KEYS = ["file_name", "text", "objects", "tag", "heldout_phrase", "heldout_pair"]
OBJECT_KEYS = ["slot", "class", "class_name", "size", "brightness"]


def _noun_of(caption: str) -> str:
    """The noun of a fashion-text caption, parsed independently of the generator's templates."""
    text = caption.removesuffix(" on a black background")
    for prefix in ("a photo of ", "a picture of "):
        text = text.removeprefix(prefix)
    text = re.sub(r"^(a pair of |an |a )", "", text)
    words = text.split()
    while words and words[0] in ("small", "large", "dark", "bright"):
        words.pop(0)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Scene sets


@pytest.mark.parametrize("name", S.SCENE_SETS)
def test_prepare_is_deterministic_and_follows_the_schema(tmp_path, name):
    a = S.prepare_scenes(name, "test", tmp_path / "a", num=300, seed=3)
    b = S.prepare_scenes(name, "test", tmp_path / "b", num=300, seed=3)
    c = S.prepare_scenes(name, "test", tmp_path / "c", num=300, seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()
    lines = (a / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 300 and len(files) == 302
    from PIL import Image

    for line in lines:
        rec = json.loads(line)
        assert list(rec) == KEYS
        assert (a / rec["file_name"]).is_file() and re.fullmatch(r"\d{6}\.png", rec["file_name"])
        assert isinstance(rec["text"], list) and rec["text"] and all(isinstance(t, str) and t for t in rec["text"])
        assert isinstance(rec["heldout_phrase"], bool) and isinstance(rec["heldout_pair"], bool)
        assert rec["tag"] in ("single", "pair", "two_same", "one_side")
        for o in rec["objects"]:
            assert list(o) == OBJECT_KEYS
            assert o["slot"] in ("center", "left", "right") and 0 <= o["class"] < 10
            assert o["class_name"] == S.CLASS_NAMES[o["class"]]
            assert o["size"] in ("large", "small") and o["brightness"] in ("bright", "dark")
    image = np.asarray(Image.open(a / "000000.png"))
    assert image.shape == (32, 32) and image.dtype == np.uint8
    images, records = S.render_scenes(name, "test", num=300, seed=3)
    assert np.array_equal(image, images[0])
    assert [json.loads(line)["text"] for line in lines] == [r["text"] for r in records]


def test_fashion_text_train_captions_never_use_heldout_phrasing():
    images, records = S.render_scenes("fashion-text", "train")
    assert images.shape == (60000, 32, 32) and len(records) == 60000
    for rec in records:
        cls = rec["objects"][0]["class"]
        assert rec["heldout_phrase"] is False and len(set(rec["text"])) == S.CAPTIONS_PER_IMAGE
        for caption in rec["text"]:
            assert not caption.startswith("a picture of")
            noun = _noun_of(caption)
            assert noun in S.SYNONYMS[cls] and noun != S.HELDOUT_SYNONYMS[cls], caption
    nouns = Counter(_noun_of(c) for r in records for c in r["text"])
    assert all(n in nouns for cls in range(10) for n in S.SYNONYMS[cls] if n != S.HELDOUT_SYNONYMS[cls])
    counts = Counter((r["objects"][0]["size"], r["objects"][0]["brightness"]) for r in records)
    assert set(counts.values()) == {15000}  # balanced size x brightness


def test_fashion_text_captions_say_what_is_drawn():
    images, records = S.render_scenes("fashion-text", "test", num=2000, seed=1)
    held = [r["heldout_phrase"] for r in records]
    assert 900 < sum(held) < 1100
    for rec in records:
        o = rec["objects"][0]
        for caption in rec["text"]:
            words = caption.split()
            assert ("small" in words) == (o["size"] == "small") and ("dark" in words) == (o["brightness"] == "dark")
            assert "large" not in words or o["size"] == "large"
            uses_heldout = caption.startswith("a picture of") or _noun_of(caption) == S.HELDOUT_SYNONYMS[o["class"]]
            assert uses_heldout == rec["heldout_phrase"], caption


def test_heldout_pairs_keep_every_class_on_both_sides():
    assert len(S.HELDOUT_PAIRS) == 20 and len(set(S.HELDOUT_PAIRS)) == 20 and len(S.SEEN_PAIRS) == 70
    assert all(a != b for a, b in S.HELDOUT_PAIRS)
    assert Counter(a for a, _ in S.HELDOUT_PAIRS) == Counter({c: 2 for c in range(10)})
    assert Counter(b for _, b in S.HELDOUT_PAIRS) == Counter({c: 2 for c in range(10)})
    _, records = S.render_scenes("fashion-pairs", "train")
    pairs = Counter((r["objects"][0]["class"], r["objects"][1]["class"]) for r in records if r["tag"] == "pair")
    assert set(pairs) == set(S.SEEN_PAIRS)  # every seen pair occurs, no held-out pair
    assert min(pairs.values()) > 400
    for c in range(10):
        assert any(a == c for a, _ in pairs) and any(b == c for _, b in pairs)
    heldout_texts = {t for a, b in S.HELDOUT_PAIRS for t in S.pair_captions(a, b)}
    train_texts = {t for r in records for t in r["text"]}
    assert not heldout_texts & train_texts
    assert not any(r["heldout_pair"] for r in records)
    tags = Counter(r["tag"] for r in records)
    assert tags == Counter({"pair": 42000, "two_same": 6000, "one_side": 12000})


def test_fashion_pairs_test_split_has_heldout_pairs_and_empty_halves():
    images, records = S.render_scenes("fashion-pairs", "test", num=3000, seed=0)
    held = [r for r in records if r["heldout_pair"]]
    assert 0.15 < len(held) / sum(r["tag"] == "pair" for r in records) < 0.3
    for image, rec in zip(images, records):
        slots = {o["slot"] for o in rec["objects"]}
        assert (image[:, :16].any()) == ("left" in slots) and (image[:, 16:].any()) == ("right" in slots)
        assert not image[:8].any() and not image[24:].any()  # 16x16 items, vertically centred
        if rec["tag"] == "two_same":
            assert rec["objects"][0]["class"] == rec["objects"][1]["class"]


def test_rendering_small_is_smaller_and_dark_is_darker():
    items, _ = S.source_items("test")
    items = items[:500]
    large = S.render_text(items, np.zeros(500, bool), np.zeros(500, bool))
    small = S.render_text(items, np.ones(500, bool), np.zeros(500, bool))
    dark = S.render_text(items, np.zeros(500, bool), np.ones(500, bool))
    assert np.array_equal(large[:, 2:30, 2:30], items)  # 28x28 zero-padded as `lddpm prepare` does
    assert not small[:, :8].any() and not small[:, 24:].any() and not small[:, :, :8].any()

    def box(x):
        rows, cols = x.any(axis=2), x.any(axis=1)
        return rows.sum(axis=1), cols.sum(axis=1)

    assert (box(small > 0)[0] < box(large > 0)[0]).all()
    assert (box(small > 0)[0] <= 16).all()
    assert (dark.astype(int).sum((1, 2)) < large.astype(int).sum((1, 2))).all()
    assert np.array_equal(dark, (large.astype(int) + 1) // 2)
    # the area resample keeps the mean intensity (up to rounding)
    ratio = small.astype(float).sum((1, 2)) * (28 / 16) ** 2 / large.astype(float).sum((1, 2))
    assert np.allclose(ratio, 1, atol=0.02)


def test_shrink_is_the_exact_area_average():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    y = S.shrink(x, 4)  # 7x7 blocks
    assert np.array_equal(y, np.floor(x.reshape(3, 4, 7, 4, 7).astype(float).mean((2, 4)) + 0.5).astype(np.uint8))
    assert np.array_equal(S.shrink(np.full((1, 28, 28), 200, np.uint8)), np.full((1, 16, 16), 200))


@pytest.mark.parametrize("name", S.SCENE_SETS)
def test_prompt_sets_are_balanced_and_marked(tmp_path, name):
    path = S.write_prompt_set(name, tmp_path / "p.jsonl", num=400, heldout="both", seed=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 400 and all(list(r) == ["prompt", "objects", "tag", "heldout_phrase", "heldout_pair"]
                                       for r in records)
    assert S.read_prompt_set(path) == records
    if name == "fashion-text":
        assert sum(r["heldout_phrase"] for r in records) == 200
        combos = Counter((r["objects"][0]["class"], r["objects"][0]["size"], r["objects"][0]["brightness"])
                         for r in records)
        assert len(combos) == 40 and set(combos.values()) == {10}
        seen = {c for r in S.render_scenes("fashion-text", "train", num=5000)[1] for c in r["text"]}
        assert not {r["prompt"] for r in records if r["heldout_phrase"]} & seen
    else:
        tags = Counter(r["tag"] for r in records)
        assert tags == Counter({"pair": 240, "two_same": 80, "one_side": 80})
        held = [r for r in records if r["heldout_pair"]]
        assert len(held) == 120
        assert all((r["objects"][0]["class"], r["objects"][1]["class"]) in S.HELDOUT_PAIRS for r in held)
        pairs = Counter((r["objects"][0]["class"], r["objects"][1]["class"]) for r in records if r["tag"] == "pair")
        assert set(pairs) == set(S.ALL_PAIRS)
    only = S.prompt_set(name, num=50, heldout="only")
    assert all(r["heldout_phrase"] or r["heldout_pair"] for r in only)
    assert not any(r["heldout_phrase"] or r["heldout_pair"] for r in S.prompt_set(name, num=50, heldout="seen"))
    assert S.prompt_set(name, num=50, seed=1) == S.prompt_set(name, num=50, seed=1)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(LddpmError, match="unknown scene set"):
        S.render_scenes("fashion-grid", "train", num=5)
    with pytest.raises(LddpmError, match="unknown split"):
        S.render_scenes("fashion-text", "val", num=5)
    with pytest.raises(LddpmError, match="at least 1"):
        S.prepare_scenes("fashion-text", "test", tmp_path / "x", num=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LddpmError, match="not a scene folder"):
        S.prepare_scenes("fashion-text", "test", tmp_path / "mine", num=5)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    S.prepare_scenes("fashion-text", "test", tmp_path / "x", num=5)
    S.prepare_scenes("fashion-text", "test", tmp_path / "x", num=3)  # a scene folder is replaced
    assert len(list((tmp_path / "x").glob("*.png"))) == 3
    with pytest.raises(LddpmError, match="heldout"):
        S.prompt_set("fashion-text", num=5, heldout="maybe")


# ---------------------------------------------------------------------------------------------
# Checker (trained on a small subset here; the full checker is in the slow test)


@pytest.fixture(scope="module")
def checker():
    from lddpm.metrics.faithfulness import train_checker

    return train_checker(num_train=6000, num_test=2000, epochs=2.0)


def test_checker_calibration_and_roundtrip(checker, tmp_path):
    from lddpm.metrics.faithfulness import load_checker, save_checker

    meta = checker.meta
    assert meta["calibration"]["size_accuracy"] > 0.99 and meta["calibration"]["brightness_accuracy"] > 0.97
    for measured in [meta["test_attributes"], *meta["test_attributes_noisy"]]:  # clean, noise std 4 and 8
        assert measured["size_accuracy"] > 0.99 and measured["brightness_accuracy"] > 0.97, measured
    assert meta["test_slot_accuracy_by_variant"]["empty"] > 0.99
    folder = save_checker(checker, tmp_path / "ck")
    again = load_checker(folder, train_if_missing=False)
    slots = S.render_text(S.source_items("test")[0][:64], np.arange(64) % 2 == 0, np.arange(64) % 3 == 0)
    assert np.array_equal(again.classify(slots), checker.classify(slots))
    assert (again.fg_threshold, again.size_threshold, again.brightness_threshold) == \
        (checker.fg_threshold, checker.size_threshold, checker.brightness_threshold)
    with pytest.raises(LddpmError, match="no scene checker"):
        load_checker(tmp_path / "missing", train_if_missing=False)


def test_checker_scores_real_text_scenes_high_and_shuffled_low(checker):
    from lddpm.metrics.faithfulness import ceiling, render_records, score_prompts

    records = S.prompt_set("fashion-text", num=800, seed=0)
    real = ceiling("fashion-text", records, checker=checker)
    assert real["class_accuracy"] > 0.65  # 0.73 measured with this small checker
    assert real["size_accuracy"] > 0.99 and real["brightness_accuracy"] > 0.97
    assert real["seen"]["num"] == real["heldout"]["num"] == 400
    images = render_records(records)
    shuffled = score_prompts(images, [records[i] for i in np.random.default_rng(0).permutation(800)], checker=checker)
    assert shuffled["class_accuracy"] < 0.25 and shuffled["all_accuracy"] < 0.1
    assert 0.35 < shuffled["size_accuracy"] < 0.65


def test_checker_detects_swaps_and_empty_halves(checker):
    from lddpm.metrics.faithfulness import check_prompts, render_records, score_prompts

    records = S.prompt_set("fashion-pairs", num=600, seed=0)
    images = render_records(records)
    real = score_prompts(images, records, checker=checker)
    assert real["slot_accuracy"] > 0.7 and real["swap_rate"] < 0.05  # 0.77, 0.0 measured
    assert real["empty_slot_accuracy"] > 0.98 and real["presence"] > 0.5  # 1.0, 0.59
    assert set(real["by_tag"]) == {"pair", "two_same", "one_side"}
    swapped = np.concatenate([images[:, :, 16:], images[:, :, :16]], axis=2)  # halves exchanged, not mirrored
    flip = score_prompts(swapped, records, checker=checker)
    res = check_prompts(images, records, checker)
    is_pair = np.array([r["tag"] == "pair" for r in records])
    # the same slots are classified, so a swap of the flipped scene is exactly a correct original pair
    assert flip["swap_rate"] == pytest.approx(res["all"][is_pair].mean())
    assert flip["swap_rate"] > 0.4 and flip["by_tag"]["pair"]["accuracy"] < 0.05
    assert flip["presence"] == pytest.approx(real["presence"])
    assert flip["by_tag"]["one_side"]["accuracy"] < 0.05
    blank = score_prompts(np.zeros_like(images), records, checker=checker)
    assert blank["pair_accuracy"] == 0 and blank["presence"] == 0 and blank["empty_slot_accuracy"] == 1


def test_score_prompts_rejects_bad_input(checker):
    from lddpm.metrics.faithfulness import score_prompts

    records = S.prompt_set("fashion-text", num=4)
    with pytest.raises(LddpmError, match="uint8"):
        score_prompts(np.zeros((4, 28, 28, 1), np.uint8), records, checker=checker)
    with pytest.raises(LddpmError, match="4 prompt records"):
        score_prompts(np.zeros((3, 32, 32, 1), np.uint8), records, checker=checker)
    mixed = records[:2] + S.prompt_set("fashion-pairs", num=2)
    with pytest.raises(LddpmError, match="mix"):
        score_prompts(np.zeros((4, 32, 32, 1), np.uint8), mixed, checker=checker)


@pytest.mark.slow
def test_full_checker_ceiling(tmp_path):
    """The full checker (60,000 train items, about 2 minutes on one core) on real test scenes."""
    from lddpm.metrics.faithfulness import ceiling, load_checker

    checker = load_checker(tmp_path / "checker", progress=False)
    assert checker.meta["test_slot_accuracy"] > 0.85  # 0.877 measured
    text = ceiling("fashion-text", S.prompt_set("fashion-text", num=1000), checker=checker)
    assert text["class_accuracy"] > 0.83 and text["all_accuracy"] > 0.82  # 0.853, 0.839 measured
    pairs = ceiling("fashion-pairs", S.prompt_set("fashion-pairs", num=1000), checker=checker)
    assert pairs["slot_accuracy"] > 0.84 and pairs["pair_accuracy"] > 0.72 and pairs["swap_rate"] < 0.02  # .874 .764 0
