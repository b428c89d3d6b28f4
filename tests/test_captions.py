"""Captioned datasets (lddpm.data.captions): the four formats read to the same images and captions, the
cache's caption table (stored under the manifest checksum), its deterministic choice, and bad inputs."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lddpm.cli import main
from lddpm.data import open_cache, prepare
from lddpm.data.captions import CaptionTable, find_format, read_captioned
from lddpm.data.preprocess import load_image
from lddpm.errors import LddpmError

# Four images; image 1 has two captions, "a red square" is shared by images 0 and 3.
CAPTIONS = [["a red square"], ["a blue circle", "a small blue circle"], ["a tree"], ["a red square", "two dogs"]]
NAMES = ["000.png", "001.png", "002.png", "003.png"]


def _pixels(i: int, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(i)
    h, w = 10 + i, 12
    return rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)


def _png(i: int, grey: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(i, grey)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path, names=NAMES, grey: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(_png(i, grey))
    return folder


def write_jsonl(folder: Path, column: str = "text", grey: bool = False) -> Path:
    write_images(folder, grey=grey)
    rows = [{"file_name": n, column: caps[0] if len(caps) == 1 else caps} for n, caps in zip(NAMES, CAPTIONS)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_csv(folder: Path) -> Path:
    write_images(folder)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption", "other"])
        for n, caps in zip(NAMES, CAPTIONS):
            w.writerow([n, caps[0] if len(caps) == 1 else json.dumps(caps), "x"])
    return folder


def write_sidecars(folder: Path) -> Path:
    names = ["a/000.png", "a/001.png", "b/002.png", "z003.png"]  # nested folders are searched, in path order
    write_images(folder, names)
    for k, (n, caps) in enumerate(zip(names, CAPTIONS)):
        ext = ".txt" if k % 2 == 0 else ".caption"
        (folder / n).with_suffix(ext).write_text("\n".join(caps) + "\n\n")
    return folder


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path) -> Path:
    """Two shards: image extensions png/jpg/jpeg (PNG bytes decode the same), captions .txt or .json."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        _tar_add(tar, "000000000.png", _png(0))
        _tar_add(tar, "000000000.txt", b"a red square")
        _tar_add(tar, "000000001.json", json.dumps({"caption": CAPTIONS[1], "width": 12}).encode())
        _tar_add(tar, "000000001.jpg", _png(1))  # caption member first: grouped by key, not order
        _tar_add(tar, "000000001.cls", b"3")  # other fields are ignored
    with tarfile.open(folder / "00001.tar", "w") as tar:
        _tar_add(tar, "sub/000000002.jpeg", _png(2))
        _tar_add(tar, "sub/000000002.json", json.dumps({"text": "a tree"}).encode())
        _tar_add(tar, "000000003.png", _png(3))
        _tar_add(tar, "000000003.txt", "a red square\ntwo dogs\n".encode())
    return folder


def write_coco(folder: Path, layout: str = "coco") -> Path:
    """`annotations/captions_train2017.json` + `train2017/` (layout "coco"), or JSON + `images/` beside it."""
    images = [{"id": 100 + i, "file_name": n, "height": 10 + i, "width": 12} for i, n in enumerate(NAMES)]
    anns = [{"id": k, "image_id": 100 + i, "caption": c}
            for k, (i, c) in enumerate((i, c) for i, caps in enumerate(CAPTIONS) for c in caps)]
    anns.sort(key=lambda a: -a["image_id"])  # joined on image_id; an image's captions keep the file's order
    if layout == "coco":
        write_images(folder / "train2017")
        path = folder / "annotations" / "captions_train2017.json"
    else:
        write_images(folder / "images")
        path = folder / "caps.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def _prep(root, tmp_path, name="c", **kw) -> Path:
    kw.setdefault("resolution", 8)
    return prepare("captioned", root=root, cache_dir=tmp_path / name, workers=1, progress=False, **kw)


def _captions_of(cache) -> list[list[str]]:
    return [cache.captions.captions_of(i) for i in range(len(cache))]


# ---------------------------------------------------------------------------------------------
# The formats


def test_every_format_reads_the_same_images_and_captions(tmp_path):
    roots = {
        "metadata": (write_jsonl(tmp_path / "jsonl"), {}),
        "metadata-csv": (write_csv(tmp_path / "csv"), {"caption_column": "caption"}),
        "sidecar": (write_sidecars(tmp_path / "side"), {}),
        "webdataset": (write_shards(tmp_path / "wds"), {}),
        "coco": (write_coco(tmp_path / "coco"), {}),
    }
    assert {k: find_format(r) for k, (r, _) in roots.items()} == {
        "metadata": "metadata", "metadata-csv": "metadata", "sidecar": "sidecar", "webdataset": "webdataset", "coco": "coco"}
    caches = {k: open_cache(_prep(r, tmp_path, k, **kw)) for k, (r, kw) in roots.items()}
    ref = caches["metadata"]
    expected = np.stack([load_image(str(tmp_path / "jsonl" / n), 8, "RGB") for n in NAMES])
    np.testing.assert_array_equal(ref.images, expected)
    for k, c in caches.items():
        assert _captions_of(c) == CAPTIONS, k
        assert c.captions.texts == ["", "a red square", "a blue circle", "a small blue circle", "a tree", "two dogs"], k
        np.testing.assert_array_equal(c.images, expected, err_msg=k)
        assert c.num_classes == 0 and c.labels.tolist() == [0] * 4 and c.channels == 3
        assert c.manifest["captions"]["format"] == k.split("-")[0]
    assert ref.path.name == "captioned-jsonl-train-8"
    assert caches["coco"].path.name == "captioned-captions_train2017.json-train-8"


def test_one_shard_and_coco_images_folder_and_image_root(tmp_path):
    write_shards(tmp_path / "wds")
    one = read_captioned(tmp_path / "wds" / "00001.tar")
    assert one.captions == CAPTIONS[2:] and [m.name for m in one.images] == ["sub/000000002.jpeg", "000000003.png"]
    path = write_coco(tmp_path / "flat", layout="images")  # caps.json + images/
    assert read_captioned(path).captions == CAPTIONS
    data = json.loads(path.read_text())
    (tmp_path / "flat" / "images").rename(tmp_path / "flat" / "pics")
    with pytest.raises(LddpmError, match="image_root"):
        read_captioned(path)
    path.write_text(json.dumps({**data, "image_root": "pics"}))
    assert read_captioned(path).images[0] == str(tmp_path / "flat" / "pics" / "000.png")


def test_split_folders_and_grey_images_stored_as_one_channel(tmp_path):
    write_jsonl(tmp_path / "ds" / "train", grey=True)
    write_jsonl(tmp_path / "ds" / "test", grey=True)
    (tmp_path / "ds" / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "002.png", "text": "t"}) + "\n")
    for n in ("000.png", "001.png", "003.png"):
        (tmp_path / "ds" / "test" / n).unlink()
    train = open_cache(_prep(tmp_path / "ds", tmp_path))
    test = open_cache(_prep(tmp_path / "ds", tmp_path, split="test"))
    assert len(train) == 4 and _captions_of(test) == [["t"]] and test.path.name == "captioned-ds-test-8"
    assert train.channels == 1 and train.manifest["preprocessing"]["mode"] == "L"
    expected = np.stack([load_image(str(tmp_path / "ds" / "train" / n), 8, "L") for n in NAMES])
    np.testing.assert_array_equal(train.images, expected)  # RGB decode then one channel == grey decode
    with pytest.raises(LddpmError, match="no split folder"):
        read_captioned(tmp_path / "ds" / "train", split="test")


def test_cache_reuse_checks_the_caption_column(tmp_path):
    root = write_jsonl(tmp_path / "ds", column="blip")
    with pytest.raises(LddpmError, match="no caption column 'text'.*blip.*data.caption_column"):
        _prep(root, tmp_path)
    folder = _prep(root, tmp_path, caption_column="blip")
    assert _prep(root, tmp_path, caption_column="blip") == folder
    assert open_cache(folder).manifest["request"]["caption_column"] == "blip"
    with pytest.raises(LddpmError, match="caption_column"):
        _prep(root, tmp_path, caption_column="text")


# ---------------------------------------------------------------------------------------------
# The caption table


def test_caption_table_storage_and_manifest(tmp_path):
    cache = open_cache(_prep(write_jsonl(tmp_path / "ds"), tmp_path))
    m = cache.manifest
    files = ["captions.json", "caption_offsets.npy", "caption_indices.npy"]
    assert m["captions"]["files"] == files and set(files) <= set(m["arrays"])
    assert m["captions"]["num_texts"] == 6 and m["captions"]["per_image"] == {"min": 1, "max": 2, "mean": 1.5}
    assert json.loads((cache.path / "captions.json").read_text())[0] == ""
    t = cache.captions
    assert t.texts[0] == "" and len(t) == 4 and t.for_image(1).tolist() == [2, 3] and t.for_image(-1).tolist() == [1, 5]
    assert np.load(cache.path / "caption_offsets.npy").tolist() == [0, 1, 3, 4, 6]


def test_changed_caption_file_is_refused_and_verify_cache_names_it(tmp_path, capsys):
    folder = _prep(write_jsonl(tmp_path / "ds"), tmp_path)
    assert main(["verify-cache", str(folder)]) == 0
    text = (folder / "captions.json").read_text()
    (folder / "captions.json").write_text(text.replace("a tree", "a tref"))  # same size
    with pytest.raises(LddpmError, match="captions.json is corrupt"):
        open_cache(folder)
    with pytest.raises(SystemExit) as exc:
        main(["verify-cache", str(folder)])
    assert exc.value.code == 2 and "captions.json" in capsys.readouterr().err
    (folder / "captions.json").write_text(text)
    m = json.loads((folder / "manifest.json").read_text())
    del m["captions"]  # dropping the table from the manifest breaks its checksum
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LddpmError, match="was edited"):
        open_cache(folder)


def _table() -> CaptionTable:
    caps = [[f"image {i} caption {j}" for j in range(1 + i % 5)] for i in range(50)]
    return CaptionTable.from_lists(caps)


def test_choose_is_a_pure_function_of_seed_step_and_image():
    t = _table()
    idx = np.arange(50)
    a = t.choose(idx, seed=3, step=7)
    np.testing.assert_array_equal(a, t.choose(idx, seed=3, step=7))
    np.testing.assert_array_equal(a[[40, 2, 9]], t.choose([40, 2, 9], seed=3, step=7))  # batch-independent
    for i in idx:
        assert a[i] in t.for_image(i)
    assert (a != t.choose(idx, seed=3, step=8)).any() and (a != t.choose(idx, seed=4, step=7)).any()
    assert (a != t.choose(idx, seed=3, step=7, stream=1)).any()
    draws = np.stack([t.choose(idx, seed=0, step=s) for s in range(200)])
    for i in idx:  # every caption of every image is drawn, about uniformly
        counts = np.bincount(draws[:, i], minlength=len(t.texts))[t.for_image(i)]
        assert counts.min() > 200 / len(counts) / 3, (i, counts)


def test_choose_agrees_across_processes(tmp_path):
    cache = open_cache(_prep(write_jsonl(tmp_path / "ds"), tmp_path))
    here = [cache.captions.choose([0, 1, 2, 3, 1], seed=11, step=s, null_prob=0.3).tolist() for s in range(20)]
    code = ("import json, sys; from lddpm.data import open_cache; t = open_cache(sys.argv[1]).captions; "
            "print(json.dumps([t.choose([0, 1, 2, 3, 1], seed=11, step=s, null_prob=0.3).tolist() for s in range(20)]))")
    out = subprocess.run([sys.executable, "-c", code, str(cache.path)], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout) == here
    assert {k for row in here for k in row[1::3]} == {0, 2, 3}  # image 1: both captions and the null prompt


def test_choose_null_prob_drops_to_the_null_prompt():
    t = _table()
    idx = np.arange(50)
    kept = t.choose(idx, seed=1, step=5)
    dropped = np.stack([t.choose(idx, seed=1, step=s, null_prob=0.25) for s in range(40)])
    assert 0.2 < (dropped == 0).mean() < 0.3
    np.testing.assert_array_equal(t.choose(idx, seed=1, step=5, null_prob=0.25)[dropped[5] != 0], kept[dropped[5] != 0])
    assert (t.choose(idx, seed=1, step=5, null_prob=1.0) == 0).all()


def test_table_from_lists_and_bad_tables():
    t = CaptionTable.from_lists([["b", "a"], ["a"]])
    assert t.texts == ["", "b", "a"] and t.indices.tolist() == [1, 2, 2] and t.offsets.tolist() == [0, 2, 3]
    with pytest.raises(ValueError):
        CaptionTable(["x"], np.array([0, 1]), np.array([0]))  # texts[0] must be ""
    with pytest.raises(ValueError):
        CaptionTable(["", "x"], np.array([0, 0, 1]), np.array([1]))  # an image without a caption
    with pytest.raises(IndexError):
        t.choose([2], 0, 0)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one message naming the file and the fix


def test_missing_images_are_refused_in_every_format(tmp_path):
    root = write_jsonl(tmp_path / "md")
    (root / "002.png").unlink()
    with pytest.raises(LddpmError, match=r"metadata.jsonl: 1 caption\(s\) name a missing image: 002.png .*remove their rows"):
        read_captioned(root)
    root = write_sidecars(tmp_path / "side")
    (root / "b" / "002.png").unlink()
    with pytest.raises(LddpmError, match=r"missing image: b/002.txt; add the image"):
        read_captioned(root)
    root = write_shards(tmp_path / "wds")
    with tarfile.open(root / "00002.tar", "w") as tar:
        _tar_add(tar, "orphan.txt", b"a caption without an image")
    with pytest.raises(LddpmError, match="missing image: 00002.tar:orphan"):
        read_captioned(root)
    path = write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "train2017" / "003.png").unlink()
    with pytest.raises(LddpmError, match="captions_train2017.json: 1 caption.*003.png; put the images in"):
        read_captioned(path)


def test_images_without_captions_are_refused_or_skipped(tmp_path):
    root = write_jsonl(tmp_path / "md")
    (root / "extra.png").write_bytes(_png(9))
    with pytest.raises(LddpmError, match=r"1 image\(s\) have no caption: extra.png.*--skip-bad"):
        read_captioned(root)
    folder = _prep(root, tmp_path, skip_bad=True)
    cache = open_cache(folder)
    assert len(cache) == 4 and cache.manifest["captions"]["skipped"] == {"no_caption": {"count": 1, "examples": ["extra.png"]}}
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[2]["text"] = ["  ", ""]  # only empty captions: none
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LddpmError, match="have no caption: 002.png, extra.png"):
        read_captioned(root)
    root = write_sidecars(tmp_path / "side")
    (root / "a" / "001.caption").unlink()
    with pytest.raises(LddpmError, match=r"no caption: a/001.png; write a <stem>.txt"):
        read_captioned(root)
    root = write_shards(tmp_path / "wds")
    with tarfile.open(root / "00002.tar", "w") as tar:
        _tar_add(tar, "lonely.webp", _png(5))
    with pytest.raises(LddpmError, match="no caption: 00002.tar:lonely"):
        read_captioned(root)
    path = write_coco(tmp_path / "coco")
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    path.write_text(json.dumps(data))
    with pytest.raises(LddpmError, match="no caption: 002.png; add an annotation"):
        read_captioned(path)
    assert read_captioned(path, skip_bad=True).captions == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[3]]


def test_non_utf8_text_is_refused(tmp_path):
    root = write_jsonl(tmp_path / "md")
    (root / "metadata.jsonl").write_bytes((root / "metadata.jsonl").read_bytes().replace(b"tree", b"tr\xe9e"))
    with pytest.raises(LddpmError, match=r"metadata.jsonl is not UTF-8 text \(byte 0xe9.*save it as UTF-8"):
        read_captioned(root)
    root = write_sidecars(tmp_path / "side")
    (root / "b" / "002.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(LddpmError, match="002.txt is not UTF-8"):
        read_captioned(root)
    root = write_shards(tmp_path / "wds")
    with tarfile.open(root / "00002.tar", "w") as tar:
        _tar_add(tar, "k.png", _png(5))
        _tar_add(tar, "k.txt", "na\u00efve".encode("latin-1"))
    with pytest.raises(LddpmError, match="00002.tar:k.txt is not UTF-8"):
        read_captioned(root)
    (root / "00002.tar").unlink()
    root_bom = write_csv(tmp_path / "bom")  # a UTF-8 BOM (spreadsheet export) is fine
    (root_bom / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + (root_bom / "metadata.csv").read_bytes())
    assert read_captioned(root_bom, caption_column="caption").captions == CAPTIONS


def test_empty_datasets_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LddpmError, match="has no captioned images; expected metadata.jsonl/csv"):
        prepare("captioned", root=tmp_path / "empty", cache_dir=tmp_path / "c", progress=False)
    root = write_images(tmp_path / "md")
    (root / "metadata.jsonl").write_text("\n")
    with pytest.raises(LddpmError, match="metadata.jsonl has no rows"):
        read_captioned(root)
    with pytest.raises(LddpmError, match="captioned needs --root"):
        prepare("captioned", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(LddpmError, match="does not exist"):
        read_captioned(tmp_path / "nowhere")
    with pytest.raises(LddpmError, match="left out by --skip-bad"):
        (root / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "text": ""}) + "\n")
        read_captioned(root, skip_bad=True)


def test_unreadable_tars_are_refused(tmp_path):
    root = write_shards(tmp_path / "wds")
    good = (root / "00000.tar").read_bytes()
    with tarfile.open(root / "00000.tar") as tar:
        end = tar.getmembers()[-1].offset_data + 512  # the end-of-archive block follows the last (short) member
    for cut in range(100, end + 512, 150):  # inside headers, inside data, inside the end block
        (root / "00000.tar").write_bytes(good[:cut])
        with pytest.raises(LddpmError, match=r"cannot read tar shard .*00000.tar .*truncated or not a tar"):
            read_captioned(root)
    (root / "00000.tar").write_bytes(good[:end + 512])  # the zero block is all that is needed
    assert len(read_captioned(root)) == 4
    (root / "00000.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(LddpmError, match="00000.tar"):
        read_captioned(root)
    import gzip
    (root / "00000.tar").write_bytes(gzip.compress(good))
    with pytest.raises(LddpmError, match="00000.tar is compressed; .*gunzip"):
        read_captioned(root)


def test_malformed_metadata_is_refused(tmp_path):
    root = write_jsonl(tmp_path / "md")
    (root / "metadata.csv").write_text("file_name,text\n000.png,x\n")
    with pytest.raises(LddpmError, match="both metadata.jsonl and metadata.csv; keep one"):
        read_captioned(root)
    (root / "metadata.csv").unlink()
    (root / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "x"}\n{"file_name": \n')
    with pytest.raises(LddpmError, match=r"metadata.jsonl:2 is not valid JSON"):
        read_captioned(root)
    (root / "metadata.jsonl").write_text('{"file_name": "000.png", "text": 3}\n')
    with pytest.raises(LddpmError, match="a caption must be a string or a list of strings"):
        read_captioned(root)
    (root / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "a"}\n{"file_name": "000.png", "text": "b"}\n')
    with pytest.raises(LddpmError, match="000.png is listed twice"):
        read_captioned(root)
    path = write_coco(tmp_path / "coco")
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 99, "image_id": 7, "caption": "x"})
    path.write_text(json.dumps(data))
    with pytest.raises(LddpmError, match="names image_id 7, which is not in `images`"):
        read_captioned(path)


def test_unreadable_image_skipped_keeps_captions_aligned(tmp_path):
    root = write_jsonl(tmp_path / "md")
    (root / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LddpmError, match="001.png.*skip-bad"):
        _prep(root, tmp_path)
    cache = open_cache(_prep(root, tmp_path, skip_bad=True))
    assert len(cache) == 3 and cache.manifest["skipped"]["count"] == 1
    assert _captions_of(cache) == [CAPTIONS[0], CAPTIONS[2], CAPTIONS[3]]
    assert cache.captions.texts == ["", "a red square", "a tree", "two dogs"]
    expected = np.stack([load_image(str(root / n), 8, "RGB") for n in ("000.png", "002.png", "003.png")])
    np.testing.assert_array_equal(cache.images, expected)
