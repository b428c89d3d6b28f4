"""Captioned image datasets: readers for the formats users have, and the caption table of a cache.

Readers return a `CaptionedData`: one image source per image (a file path, or a member of a tar
shard) and one list of captions per image. `read_captioned(root, split=...)` picks the format
from what `root` is (see `find_format`):

  metadata    an image folder with `metadata.jsonl` or `metadata.csv` at its root (Hugging Face
              `imagefolder`): column `file_name` (path relative to the folder) and a caption column
              (`text` by default), whose value is a string or a list of strings (in CSV a list is a
              JSON array string such as `["a cat", "a small cat"]`).
  sidecar     images with `<stem>.txt` or `<stem>.caption` beside them (kohya sd-scripts,
              invoke-training): the file is one caption; several non-empty lines are several captions.
  webdataset  uncompressed `.tar` shards (a folder of them, or one shard): members sharing a key (the
              path up to the first dot of the file name) form one sample; the image is its
              `png`/`jpg`/`jpeg`/`webp` member, the caption(s) its `.txt` member (lines as for sidecars)
              or else its `.json` member's caption column (`text` by default), or `caption`.
  coco        a COCO captions JSON file (`images[]{id, file_name}`, `annotations[]{image_id, caption}`),
              images found as described in `coco_image_folder`.

Captions are stripped of surrounding white space; empty ones are dropped (the empty caption is the
null prompt), and repeats within one image are kept once. Text must be UTF-8 (a BOM is allowed).
By default a dataset with an image that has no caption, or a caption that names a missing image, is
refused; `skip_bad=True` leaves such images out and counts them instead.

`CaptionTable` is what a prepared cache stores: the distinct captions (`texts`, index 0 always "",
the null prompt) and each image's caption indices (ragged: `offsets`, `indices`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lddpm import seeding
from lddpm.data import integrity
from lddpm.data.preprocess import ImageSource, TarMember
from lddpm.data.readers import IMAGE_EXTENSIONS, RawDataset
from lddpm.errors import LddpmError

SIDECAR_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
WEBDATASET_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
FORMATS = ("metadata", "sidecar", "webdataset", "coco")
DEFAULT_CAPTION_COLUMN = "text"
SKIP_HINT = "or pass --skip-bad (skip_bad=True) to leave such images out"

# Files of a cache's caption table (lddpm.data.cache), in the order of the manifest checksum.
CAPTION_FILES = ("captions.json", "caption_offsets.npy", "caption_indices.npy")


@dataclass
class CaptionedData:
    """What a captioned-format reader found: images (paths or tar members) and their captions."""

    images: list[ImageSource]
    captions: list[list[str]]  # one non-empty list per image
    format: str  # one of FORMATS
    root: str  # the folder or file that was read
    sources: list[dict]  # manifest entries describing the source files
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> items left out (skip_bad)

    def __len__(self) -> int:
        return len(self.images)

    def to_raw(self) -> RawDataset:
        """As the cache's RawDataset: no classes (labels all 0), grey or RGB decided after decoding."""
        info = {"format": self.format, "skipped": {k: {"count": len(v), "examples": v[:20]}
                                                   for k, v in self.skipped.items()}}
        return RawDataset(labels=np.zeros(len(self.images), dtype=np.int64), class_names=[], mode="auto",
                          sources=self.sources, fingerprint="size+mtime", files=list(self.images), root=self.root,
                          captions=self.captions, caption_info=info)


# ---------------------------------------------------------------------------------------------
# Small helpers: text, caption values, problems


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes (optional BOM) -> str; LddpmError naming `where` if they are not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LddpmError(
            f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LddpmError(f"cannot read {path} ({exc.strerror}); check the file and its permissions") from None
    return decode_text(data, str(path))


def caption_lines(text: str) -> list[str]:
    """A caption file's captions: its non-empty lines, stripped (one line = one caption)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def caption_list(value, where: str) -> list[str]:
    """A caption column's value (str, list of str, or None) -> non-empty stripped captions."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise LddpmError(f"{where}: a caption must be a string or a list of strings, got {json.dumps(value)[:80]}")


def _unique(captions: list[str]) -> list[str]:
    return list(dict.fromkeys(captions))


class _Problems:
    """Collects images without a caption / captions without an image; raises or records skips."""

    def __init__(self, where: str, skip_bad: bool):
        self.where, self.skip_bad = where, skip_bad
        self.no_caption: list[str] = []
        self.missing_image: list[str] = []

    def check(self, no_caption_fix: str, missing_fix: str) -> dict[str, list[str]]:
        """Raise for the first kind of problem found (unless skip_bad); return the skipped items."""
        for items, what, fix in ((self.missing_image, "caption(s) name a missing image", missing_fix),
                                 (self.no_caption, "image(s) have no caption", no_caption_fix)):
            if items and not self.skip_bad:
                examples = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                raise LddpmError(f"{self.where}: {len(items)} {what}: {examples}; {fix}, {SKIP_HINT}")
        return {k: v for k, v in (("missing_image", self.missing_image), ("no_caption", self.no_caption)) if v}


def _listing_source(root: Path, files: list[Path], kind: str) -> dict:
    """One manifest entry fingerprinting many files by (relative path, size, mtime_ns)."""
    digest, total = hashlib.sha256(), 0
    for f in files:
        st = os.stat(f)
        total += st.st_size
        digest.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"path": str(root), "kind": kind, "num_files": len(files), "total_bytes": total,
            "listing_sha256": digest.hexdigest(),
            "listing": "sha256 of 'relative path<TAB>size<TAB>mtime_ns' lines (file bytes not hashed)"}


def _file_source(path: Path, kind: str, data: bytes) -> dict:
    return {"path": str(path), "kind": kind, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _walk_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden names skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


# ---------------------------------------------------------------------------------------------
# Image folder + metadata.jsonl / metadata.csv


def _metadata_rows(path: Path) -> list[tuple[str, dict]]:
    """(`file:line` label, row dict) for each row of metadata.jsonl or metadata.csv."""
    text = _read_text_file(path)
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise LddpmError(f"{path}:{n} is not valid JSON ({exc}); one JSON object per line is expected") from None
            if not isinstance(row, dict):
                raise LddpmError(f"{path}:{n} is not a JSON object; each line must be like "
                                 '{"file_name": "0001.png", "text": "a caption"}')
            rows.append((f"{path}:{n}", row))
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for row in reader:
                rows.append((f"{path}:{reader.line_num}", row))
        except csv.Error as exc:
            raise LddpmError(f"{path} is not valid CSV ({exc}); fix the file") from None
    return rows


def _csv_caption(value: str | None, where: str):
    """A CSV cell: a JSON array string is a list of captions, anything else one caption."""
    if value is not None and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list):
            return parsed
    return value


def read_metadata_folder(folder: str | os.PathLike, *, caption_column: str = DEFAULT_CAPTION_COLUMN,
                         skip_bad: bool = False) -> CaptionedData:
    """An image folder with metadata.jsonl or metadata.csv at its root (`file_name` + caption column).

    Every image file under the folder must be listed (an unlisted image has no caption).
    """
    folder = Path(folder)
    present = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if not present:
        raise LddpmError(f"{folder} has no {' or '.join(METADATA_FILES)}")
    if len(present) > 1:
        raise LddpmError(f"{folder} has both {present[0].name} and {present[1].name}; keep one of them")
    meta = present[0]
    rows = _metadata_rows(meta)
    if not rows:
        raise LddpmError(f"{meta} has no rows; add one per image ({{\"file_name\": ..., \"{caption_column}\": ...}})")
    if not any("file_name" in row for _, row in rows):
        raise LddpmError(f"{meta} has no `file_name` column (columns: {', '.join(sorted(rows[0][1])) or 'none'}); "
                         "name the image path column file_name")
    if not any(caption_column in row for _, row in rows):
        raise LddpmError(f"{meta} has no caption column {caption_column!r} (columns: {', '.join(sorted(rows[0][1]))}); "
                         "set data.caption_column to the column that holds the captions")
    problems = _Problems(str(meta), skip_bad)
    images: list[ImageSource] = []
    captions: list[list[str]] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise LddpmError(f"{where}: `file_name` is missing or not a string; give the image path relative to {folder}")
        rel = posixpath.normpath(name.strip().replace("\\", "/"))
        if rel in seen:
            raise LddpmError(f"{where}: {rel} is listed twice (also at {seen[rel]}); put all its captions in one row as a list")
        seen[rel] = where
        value = row.get(caption_column)
        if meta.suffix == ".csv":
            value = _csv_caption(value, where)
        caps = _unique(caption_list(value, f"{where} column {caption_column!r}"))
        path = folder / rel
        if not path.is_file():
            problems.missing_image.append(f"{rel} ({where})")
        elif not caps:
            problems.no_caption.append(rel)
        else:
            images.append(str(path))
            captions.append(caps)
    files = _walk_images(folder)
    problems.no_caption += [_rel(p, folder) for p in files if _rel(p, folder) not in seen]
    skipped = problems.check(no_caption_fix=f"add a row with a {caption_column!r} value for each image in {meta.name} "
                             "or remove the image",
                             missing_fix=f"add the images or remove their rows from {meta.name}")
    data = meta.read_bytes()
    listed = [Path(p) for p in images]
    sources = [_file_source(meta, "captions", data), _listing_source(folder, listed, "images")]
    return CaptionedData(images, captions, "metadata", str(folder), sources, skipped)


# ---------------------------------------------------------------------------------------------
# Sidecar caption files


def read_sidecar_folder(folder: str | os.PathLike, *, skip_bad: bool = False) -> CaptionedData:
    """Images with a `<stem>.txt` or `<stem>.caption` file beside them (searched recursively)."""
    folder = Path(folder)
    images = _walk_images(folder)
    sidecars: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.suffix.lower() in SIDECAR_EXTENSIONS and not f.startswith("."):
                stem = p.with_suffix("")
                if stem in sidecars:
                    raise LddpmError(f"{sidecars[stem]} and {p} both caption {stem.name}; keep one of them")
                sidecars[stem] = p
    problems = _Problems(str(folder), skip_bad)
    out_images: list[ImageSource] = []
    captions: list[list[str]] = []
    used: set[Path] = set()
    for img in images:
        side = sidecars.get(img.with_suffix(""))
        if side is None:
            problems.no_caption.append(_rel(img, folder))
            continue
        used.add(side)
        caps = _unique(caption_lines(_read_text_file(side)))
        if not caps:
            problems.no_caption.append(f"{_rel(img, folder)} (empty {side.name})")
            continue
        out_images.append(str(img))
        captions.append(caps)
    problems.missing_image += [_rel(p, folder) for stem, p in sorted(sidecars.items()) if p not in used]
    skipped = problems.check(
        no_caption_fix="write a <stem>.txt (or .caption) file with the caption beside each image, or remove the image",
        missing_fix="add the image (same stem, an image extension) beside each caption file, or remove the caption file")
    caption_files = [sidecars[Path(p).with_suffix("")] for p in out_images]
    sources = [_listing_source(folder, [Path(p) for p in out_images], "images"),
               _listing_source(folder, caption_files, "captions")]
    return CaptionedData(out_images, captions, "sidecar", str(folder), sources, skipped)


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards


def _json_caption(data: bytes, where: str, caption_column: str):
    try:
        obj = json.loads(decode_text(data, where))
    except ValueError as exc:
        raise LddpmError(f"{where} is not valid JSON ({exc}); fix or remove the sample") from None
    if not isinstance(obj, dict):
        raise LddpmError(f"{where} is not a JSON object; a sample's .json must be like {{\"caption\": \"...\"}}")
    keys = [caption_column] if caption_column != DEFAULT_CAPTION_COLUMN else ["text", "caption"]
    for key in keys:
        if key in obj:
            return caption_list(obj[key], f"{where} key {key!r}")
    return []


def _read_shard(shard: Path, caption_column: str, problems: _Problems) -> tuple[list[ImageSource], list[list[str]]]:
    """The samples of one uncompressed tar shard, in the order their keys first appear."""
    fix = "the file is truncated or not a tar: re-create it or remove it from the folder"
    try:
        with open(shard, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise LddpmError(f"cannot read tar shard {shard} ({exc.strerror}); check the file") from None
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"\x28\xb5\x2f\xfd":
        raise LddpmError(f"tar shard {shard} is compressed; lddpm reads uncompressed .tar shards "
                         "(decompress it, e.g. `gunzip -c x.tar.gz > x.tar`)")
    size = shard.stat().st_size
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = posixpath.split(m.name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = posixpath.join(d, stem), ext.lower()
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
                sample = samples.setdefault(key, {})
                where = f"{shard}:{m.name}"
                if ext in WEBDATASET_IMAGE_EXTENSIONS:
                    if "image" in sample:
                        raise LddpmError(f"{shard}: sample {key!r} has two images ({sample['image'].name} and {m.name}); "
                                         "keep one image per key")
                    sample["image"] = TarMember(str(shard), m.name, m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    data = tar.extractfile(m).read()
                    sample[ext] = _unique(caption_lines(decode_text(data, where)) if ext == "txt"
                                          else _json_caption(data, where, caption_column))
            # tarfile ends quietly at a truncated or damaged header: require the end-of-archive zero block
            with open(shard, "rb") as f:
                f.seek(tar.offset)
                if f.read(512) != bytes(512):
                    raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LddpmError(f"cannot read tar shard {shard} ({exc}); {fix}") from None
    images, captions = [], []
    for key, s in samples.items():
        caps = s.get("txt") or s.get("json") or []
        if "image" not in s:
            if "txt" in s or "json" in s:
                problems.missing_image.append(f"{shard.name}:{key}")
            continue
        if not caps:
            problems.no_caption.append(f"{shard.name}:{key}")
            continue
        images.append(s["image"])
        captions.append(caps)
    return images, captions


def read_webdataset(path: str | os.PathLike, *, caption_column: str = DEFAULT_CAPTION_COLUMN,
                    skip_bad: bool = False) -> CaptionedData:
    """WebDataset samples from one uncompressed `.tar` shard, or every `*.tar` in a folder (sorted)."""
    path = Path(path)
    shards = [path] if path.is_file() else sorted(p for p in path.glob("*.tar") if p.is_file())
    if not shards:
        raise LddpmError(f"no .tar shards in {path}")
    problems = _Problems(str(path), skip_bad)
    images: list[ImageSource] = []
    captions: list[list[str]] = []
    for shard in shards:
        i, c = _read_shard(shard, caption_column, problems)
        images += i
        captions += c
    skipped = problems.check(
        no_caption_fix="give each sample a .txt (or a .json with a caption) member, or remove the image",
        missing_fix="give each captioned sample a png/jpg/jpeg/webp member, or remove its caption member")
    root = path.parent if path.is_file() else path
    sources = [_listing_source(root, shards, "tar shards")]
    return CaptionedData(images, captions, "webdataset", str(path), sources, skipped)


# ---------------------------------------------------------------------------------------------
# COCO captions JSON


def coco_image_folder(json_path: Path, data: dict, first_file: str) -> Path:
    """Where the images of a COCO captions file are: the first of these that holds its first image:

    1. `image_root` in the JSON (an lddpm addition; relative to the JSON's folder),
    2. the JSON's folder, 3. `<JSON's folder>/images`,
    4. the COCO layout `annotations/captions_<split>.json` -> `<annotations/..>/<split>` (e.g. `train2017`).
    """
    base = json_path.parent
    candidates = []
    if isinstance(data.get("image_root"), str):
        candidates.append(base / data["image_root"])
    candidates += [base, base / "images"]
    if json_path.stem.startswith("captions_"):
        candidates.append(base.parent / json_path.stem[len("captions_"):])
    for c in candidates:
        if (c / first_file).is_file():
            return c
    raise LddpmError(f"{json_path}: cannot find its first image {first_file} in any of "
                     f"{', '.join(str(c) for c in candidates)}; put the images there or add "
                     "\"image_root\": \"<folder relative to the JSON>\" to the JSON")


def read_coco(path: str | os.PathLike, *, skip_bad: bool = False) -> CaptionedData:
    """A COCO captions file: `images[]{id, file_name}` joined with `annotations[]{image_id, caption}`."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = json.loads(decode_text(raw, str(path)))
    except ValueError as exc:
        raise LddpmError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise LddpmError(f"{path} is not a COCO captions file: it needs lists `images` ({{id, file_name}}) "
                         "and `annotations` ({image_id, caption})")
    by_id: dict = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise LddpmError(f"{path}: images[{k}] lacks `id` or a string `file_name`")
        if img["id"] in by_id:
            raise LddpmError(f"{path}: image id {img['id']!r} appears twice in `images`")
        by_id[img["id"]] = []
    if not by_id:
        raise LddpmError(f"{path} lists no images; nothing to prepare")
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise LddpmError(f"{path}: annotations[{k}] lacks `image_id`")
        if ann["image_id"] not in by_id:
            raise LddpmError(f"{path}: annotations[{k}] names image_id {ann['image_id']!r}, which is not in `images`; "
                             "fix the file (or use the matching images list)")
        by_id[ann["image_id"]] += caption_list(ann.get("caption"), f"{path}: annotations[{k}] caption")
    folder = coco_image_folder(path, data, data["images"][0]["file_name"])
    problems = _Problems(str(path), skip_bad)
    images: list[ImageSource] = []
    captions: list[list[str]] = []
    for img in data["images"]:
        f = folder / img["file_name"]
        caps = _unique(by_id[img["id"]])
        if not f.is_file():
            problems.missing_image.append(str(f))
        elif not caps:
            problems.no_caption.append(img["file_name"])
        else:
            images.append(str(f))
            captions.append(caps)
    skipped = problems.check(no_caption_fix="add an annotation with a caption for each image, or remove the image",
                             missing_fix=f"put the images in {folder}")
    sources = [_file_source(path, "captions", raw), _listing_source(folder, [Path(p) for p in images], "images")]
    return CaptionedData(images, captions, "coco", str(path), sources, skipped)


# ---------------------------------------------------------------------------------------------
# Format detection


def find_format(path: str | os.PathLike) -> str:
    """The format of a file or folder: a `.json` file is COCO, a `.tar` file a shard; a folder with
    metadata.jsonl/csv is `metadata`, else one with `.tar` files `webdataset`, else `sidecar`."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix == ".tar":
            return "webdataset"
        raise LddpmError(f"{path}: a captioned dataset file must be a COCO captions .json or a WebDataset .tar; "
                         "for metadata.jsonl/csv give the folder that holds it")
    if not path.is_dir():
        raise LddpmError(f"captioned dataset {path} does not exist; give a folder or a COCO .json / .tar file")
    if any((path / m).is_file() for m in METADATA_FILES):
        return "metadata"
    if any(p.is_file() for p in path.glob("*.tar")):
        return "webdataset"
    return "sidecar"


def split_location(root: str | os.PathLike, split: str) -> Path:
    """What to read for `split`: `root/<split>` when that folder exists, else `root` itself (a file
    root for any split; a folder root for split 'train' only)."""
    root = Path(root)
    if root.is_dir() and (root / split).is_dir():
        return root / split
    if root.is_file() or split == "train":
        return root
    raise LddpmError(f"captioned: no split folder {root / split} (a folder root without split folders is split 'train')")


def read_captioned(root: str | os.PathLike, *, split: str = "train", caption_column: str = DEFAULT_CAPTION_COLUMN,
                   skip_bad: bool = False) -> CaptionedData:
    """Read a captioned dataset of any supported format (see the module docstring); never empty."""
    if not isinstance(caption_column, str) or not caption_column:
        raise LddpmError(f"caption_column must be a non-empty column name, got {caption_column!r}")
    where = split_location(root, split)
    fmt = find_format(where)
    if fmt == "metadata":
        data = read_metadata_folder(where, caption_column=caption_column, skip_bad=skip_bad)
    elif fmt == "webdataset":
        data = read_webdataset(where, caption_column=caption_column, skip_bad=skip_bad)
    elif fmt == "coco":
        data = read_coco(where, skip_bad=skip_bad)
    else:
        data = read_sidecar_folder(where, skip_bad=skip_bad)
    if not data.images:
        left = sum(len(v) for v in data.skipped.values())
        raise LddpmError(
            f"captioned dataset {where} ({fmt}) has no captioned images"
            + (f" ({left} left out by --skip-bad)" if left else "")
            + "; expected metadata.jsonl/csv with file_name + captions, images with .txt/.caption files, "
            ".tar shards, or a COCO captions .json"
        )
    return data


# ---------------------------------------------------------------------------------------------
# The caption table of a cache


class CaptionTable:
    """Distinct captions and each image's caption indices (ragged), as stored in a cache.

    `texts[0]` is always "" (the null prompt, never an image's caption); image i's captions are
    `texts[k]` for k in `indices[offsets[i]:offsets[i + 1]]` (at least one each).
    """

    def __init__(self, texts: list[str], offsets: np.ndarray, indices: np.ndarray):
        self.texts = list(texts)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        ok = (len(self.texts) >= 1 and self.texts[0] == "" and all(isinstance(t, str) for t in self.texts)
              and self.offsets.ndim == 1 and len(self.offsets) >= 1 and self.offsets[0] == 0
              and self.indices.ndim == 1 and self.offsets[-1] == len(self.indices)
              and bool(np.all(np.diff(self.offsets) >= 1))
              and (len(self.indices) == 0 or (self.indices.min() >= 1 and self.indices.max() < len(self.texts))))
        if not ok:
            raise ValueError("inconsistent caption table (texts[0] must be '', offsets increasing from 0, "
                             "every image at least one caption index in 1..len(texts)-1)")

    @classmethod
    def from_lists(cls, captions: list[list[str]]) -> CaptionTable:
        """Build from one list of captions per image; texts in order of first appearance after ""."""
        index: dict[str, int] = {"": 0}
        offsets, indices = [0], []
        for caps in captions:
            for c in caps:
                indices.append(index.setdefault(c, len(index)))
            offsets.append(len(indices))
        return cls(list(index), np.array(offsets, dtype=np.int64), np.array(indices, dtype=np.int64))

    def __len__(self) -> int:
        """Number of images."""
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"CaptionTable({len(self)} images, {len(self.texts) - 1} distinct captions)"

    def for_image(self, i: int) -> np.ndarray:
        """Caption indices (into `texts`) of image `i`."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        i = i % len(self)
        return self.indices[self.offsets[i]:self.offsets[i + 1]]

    def captions_of(self, i: int) -> list[str]:
        """The caption strings of image `i`."""
        return [self.texts[k] for k in self.for_image(i)]

    def choose(self, image_indices, seed: int, step: int, stream: int = 0, *, null_prob: float = 0.0) -> np.ndarray:
        """One caption index per image: uniform over the image's captions, a pure function of
        (seed, step, stream, image index) (`seeding.item_hashes`), whatever else is in the batch.

        `null_prob` > 0 replaces the choice by 0 (the null prompt "") with that probability, drawn
        from an independent stream: caption dropout for classifier-free guidance.
        """
        idx = np.asarray(image_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"image indices out of range for {len(self)} images")
        start = self.offsets[idx]
        count = (self.offsets[idx + 1] - start).astype(np.uint64)
        u = seeding.item_hashes(seed, step, 2 * stream, idx)
        out = self.indices[start + (u % count).astype(np.int64)]
        if null_prob > 0:
            v = seeding.item_hashes(seed, step, 2 * stream + 1, idx)
            drop = (v >> np.uint64(11)).astype(np.float64) * 2.0**-53 < null_prob
            out = np.where(drop, 0, out)
        return out

    # -- storage ---------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> dict:
        """Write CAPTION_FILES into `folder`; return their manifest records (sha256, size, ...)."""
        folder = Path(folder)
        text = json.dumps(self.texts, ensure_ascii=False, indent=0) + "\n"
        (folder / CAPTION_FILES[0]).write_bytes(text.encode("utf-8"))
        np.save(folder / CAPTION_FILES[1], self.offsets)
        np.save(folder / CAPTION_FILES[2], self.indices)
        shapes = {CAPTION_FILES[0]: ([len(self.texts)], "utf-8 json list of str"),
                  CAPTION_FILES[1]: (self.offsets.shape, self.offsets.dtype),
                  CAPTION_FILES[2]: (self.indices.shape, self.indices.dtype)}
        return {n: integrity.array_record(folder / n, *shapes[n]) for n in CAPTION_FILES}

    @classmethod
    def load(cls, folder: str | os.PathLike, *, fix: str = "prepare the cache again") -> CaptionTable:
        """Read the table saved in `folder` (checksums are the cache's job); LddpmError if unreadable."""
        folder = Path(folder)
        try:
            texts = json.loads((folder / CAPTION_FILES[0]).read_bytes().decode("utf-8"))
            offsets = np.load(folder / CAPTION_FILES[1])
            indices = np.load(folder / CAPTION_FILES[2])
            if not isinstance(texts, list):
                raise ValueError(f"{CAPTION_FILES[0]} is not a JSON list")
            return cls(texts, offsets, indices)
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise LddpmError(f"cannot read the caption table in {folder}: {exc}; {fix}") from None
