"""Readers for the raw dataset formats: IDX (MNIST family), CIFAR python pickles, image folders.

Array datasets (IDX, CIFAR) are returned whole as uint8 arrays; folder datasets as a list of
(file, label) pairs that the preprocessing step decodes in worker processes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lddpm.data.integrity import sha256_file
from lddpm.errors import LddpmError

FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html) with their published MD5.
CIFAR_ARCHIVES = {
    "cifar10": {
        "filename": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels_key": b"labels",
        "names_key": b"label_names",
    },
    "cifar100": {
        "filename": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels_key": b"fine_labels",
        "names_key": b"fine_label_names",
    },
}


@dataclass
class RawDataset:
    """What a reader found: either `images` (uint8 array) or `files` (to decode), plus labels
    (and, for captioned datasets, captions: see lddpm.data.captions)."""

    labels: np.ndarray
    class_names: list[str]
    mode: str  # "L" (grey), "RGB", or "auto" (decoded as RGB, stored grey if every pixel is)
    sources: list[dict]  # manifest entries describing the source files
    fingerprint: str  # "sha256" or "size+mtime"
    images: np.ndarray | None = None  # (N,H,W) grey or (N,H,W,3) RGB, uint8
    files: list = field(default_factory=list)  # paths (str), or preprocess.TarMember for images in tar shards
    root: str = ""
    captions: list[list[str]] | None = None  # one non-empty list per file
    caption_info: dict | None = None  # the reader's format and what it left out (manifest `captions`)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def _idx_names(split: str, kind: str) -> list[str]:
    prefix = {"train": "train", "test": "t10k"}[split]
    ndim = 3 if kind == "images" else 1
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    return [s + ext for s in stems for ext in (".gz", "")]


MAX_IDX_BYTES = 1 << 32  # 4 GiB of pixels: far beyond any MNIST-like set; a larger header is damage


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw) of unsigned bytes; checks the magic number and size.

    Only as many bytes as the header announces (plus one, to detect extra data) are read, so a
    gzip member that inflates to gigabytes is refused without inflating it.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read(4)
            if len(data) == 4 and data[:3] == b"\x00\x00\x08" and data[3] in (1, 3):
                data += f.read(4 * data[3])
                if len(data) == 4 + 4 * data[3]:
                    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=data[3], offset=4))
                    body = int(np.prod(dims, dtype=np.int64))
                    if body > MAX_IDX_BYTES:
                        raise LddpmError(f"IDX file {path} announces {body} bytes of data (dims {dims}), more than "
                                         f"lddpm reads ({MAX_IDX_BYTES}); the header is damaged: re-download the file")
                    data += f.read(body + 1)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise LddpmError(f"cannot read IDX file {path}: {exc} (corrupt or truncated; re-download it)")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] not in (1, 3):
        raise LddpmError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number {data[:4].hex() or 'empty'}; "
            "expected 00000801 for labels or 00000803 for images)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LddpmError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        size = f"more than {expected}" if len(data) > expected else str(len(data))
        raise LddpmError(
            f"IDX file {path} has {size} bytes but its header (dims {dims}) says {expected}: "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_like(name: str, split: str, root: str | os.PathLike | None) -> RawDataset:
    """Read MNIST or Fashion-MNIST from the standard IDX files under `root`."""
    if split not in ("train", "test"):
        raise LddpmError(f"unknown split {split!r} for {name}; choose 'train' or 'test'")
    if root is None:
        if name != "fashion-mnist":
            raise LddpmError(
                f"{name} needs --root DIR: a folder with the IDX files "
                f"({', '.join(_idx_names(split, 'images')[:1] + _idx_names(split, 'labels')[:1])})"
            )
        root = FASHION_MNIST_DEFAULT_ROOT
    root = Path(root)
    found = {}
    for kind in ("images", "labels"):
        candidates = [root / n for n in _idx_names(split, kind)]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            how = (
                "install them with `apt-get install dataset-fashion-mnist` or pass --root DIR"
                if name == "fashion-mnist"
                else "download the MNIST IDX files and pass --root DIR"
            )
            raise LddpmError(
                f"{name} {split} {kind} not found; expected one of: "
                f"{', '.join(str(p) for p in candidates)}; {how}"
            )
        found[kind] = hit
    images, labels = read_idx(found["images"]), read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1:
        raise LddpmError(f"{found['images']} must hold 3-d images and {found['labels']} 1-d labels")
    if len(images) != len(labels):
        raise LddpmError(
            f"{found['images']} has {len(images)} images but {found['labels']} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= 10:
        raise LddpmError(f"{found['labels']} has label {labels.max()}; expected 0..9")
    sources = [{"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)} for p in found.values()]
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return RawDataset(
        labels=labels.astype(np.int64), class_names=list(names), mode="L", sources=sources,
        fingerprint="sha256", images=images, root=str(root),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR python pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: CIFAR batches hold dicts, lists, bytes, ndarrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]  # numpy >= 2 (files from numpy 1 / Python 2)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def load_cifar_pickle(data: bytes, where: str) -> dict:
    """Unpickle one CIFAR batch with the restricted unpickler; errors name `where`."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure here means a corrupt or hostile file
        raise LddpmError(f"cannot read CIFAR batch {where}: {exc}")
    if not isinstance(obj, dict):
        raise LddpmError(f"CIFAR batch {where} is not a dict (got {type(obj).__name__})")
    return obj


def cifar_locations(name: str, root: Path) -> tuple[Path, Path]:
    """The archive path and the extracted folder path where `name` may live under `root`."""
    spec = CIFAR_ARCHIVES[name]
    return root / spec["filename"], root / spec["folder"]


def read_cifar(name: str, split: str, root: str | os.PathLike | None, default_root: Path) -> RawDataset:
    """Read CIFAR-10/100 (fine labels) from the python archive or its extracted folder."""
    if split not in ("train", "test"):
        raise LddpmError(f"unknown split {split!r} for {name}; choose 'train' or 'test'")
    spec = CIFAR_ARCHIVES[name]
    root = Path(root) if root is not None else default_root
    archive, folder = cifar_locations(name, root)
    if root.name == spec["folder"]:  # --root pointing at the extracted folder itself
        folder = root
    members = spec[split]
    wanted = members + [spec["meta"]]
    blobs: dict[str, bytes] = {}
    if folder.is_dir():
        for m in wanted:
            p = folder / m
            if not p.is_file():
                raise LddpmError(f"{name}: missing {p} (the extracted {spec['folder']} folder is incomplete)")
            blobs[m] = p.read_bytes()
        sources = [{"path": str(folder / m), "size": len(blobs[m]), "sha256": hashlib.sha256(blobs[m]).hexdigest()}
                   for m in wanted]
    elif archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in wanted:
                    try:
                        f = tar.extractfile(f"{spec['folder']}/{m}")
                    except KeyError:
                        raise LddpmError(f"archive {archive} has no member {spec['folder']}/{m}")
                    if f is None:
                        raise LddpmError(f"archive member {spec['folder']}/{m} in {archive} is not a file")
                    blobs[m] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise LddpmError(f"cannot read archive {archive}: {exc} (truncated or corrupt; delete it and re-download)")
        sources = [{"path": str(archive), "size": archive.stat().st_size, "sha256": sha256_file(archive)}]
    else:
        raise LddpmError(
            f"{name} not found; expected {archive} or the extracted folder {folder}; "
            f"run `lddpm prepare {name} --download` (online) or pass --root DIR"
        )
    origin = folder if folder.is_dir() else archive
    images, labels = [], []
    for m in members:
        batch = load_cifar_pickle(blobs[m], f"{m} in {origin}")
        data, lab = batch.get(b"data"), batch.get(spec["labels_key"])
        if not isinstance(data, np.ndarray) or lab is None:
            raise LddpmError(f"CIFAR batch {m} lacks b'data' or {spec['labels_key']!r}")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise LddpmError(
                f"CIFAR batch {m} has data {data.dtype} {data.shape} and {len(lab)} labels; "
                "expected uint8 (N, 3072) and N labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lab, dtype=np.int64))
    meta = load_cifar_pickle(blobs[spec["meta"]], f"{spec['meta']} in {origin}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec["names_key"], [])]
    labels = np.concatenate(labels)
    if not names or (labels.size and labels.max() >= len(names)) or (labels.size and labels.min() < 0):
        raise LddpmError(f"{name}: labels do not match the class names in {spec['meta']}")
    return RawDataset(
        labels=labels, class_names=names, mode="RGB", sources=sources, fingerprint="sha256",
        images=np.ascontiguousarray(np.concatenate(images)), root=str(root),
    )


# ---------------------------------------------------------------------------------------------
# Image folders (ImageNet-100 and users' own data)


def imagenet100_classes() -> list[str]:
    """The 100 ImageNet wnids of Tian et al. 2019 (CMC), in label order."""
    text = (Path(__file__).parent / "imagenet100_classes.txt").read_text()
    return [w for w in text.split() if w]


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder_sources(files: list[str], root: Path) -> list[dict]:
    """One manifest entry fingerprinting a big file set by (relative path, size, mtime_ns)."""
    digest = hashlib.sha256()
    total = 0
    for f in files:
        st = os.stat(f)
        total += st.st_size
        digest.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return [{"path": str(root), "num_files": len(files), "total_bytes": total,
             "listing_sha256": digest.hexdigest(),
             "listing": "sha256 of 'relative path<TAB>size<TAB>mtime_ns' lines, in label order (file bytes not hashed)"}]


def read_image_folder(
    split_dir: Path, class_names: list[str] | None = None, *, dataset: str = "imagefolder"
) -> RawDataset:
    """List `split_dir/<class>/*.<image>`; classes are the given names or the sorted subfolders."""
    if not split_dir.is_dir():
        raise LddpmError(f"{dataset}: folder {split_dir} does not exist")
    discovered = class_names is None  # classes from the subfolders (an empty one can be removed), not a fixed list
    if class_names is None:
        class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_names:
            raise LddpmError(f"{dataset}: {split_dir} has no class subfolders (expected {split_dir}/<class>/<image>)")
    else:
        missing = [c for c in class_names if not (split_dir / c).is_dir()]
        if missing:
            raise LddpmError(
                f"{dataset}: {len(missing)} of {len(class_names)} class folders missing under {split_dir}, "
                f"e.g. {', '.join(str(split_dir / c) for c in missing[:3])}; expected an ImageNet-style "
                "tree <root>/<split>/<wnid>/*.JPEG (validation images sorted into wnid folders)"
            )
    files, labels, empty = [], [], []
    for label, c in enumerate(class_names):
        imgs = _list_images(split_dir / c)
        files += [str(p) for p in imgs]
        labels += [label] * len(imgs)
        if not imgs:  # a given class list (ImageNet-100) or the subfolders: an empty class is a mistake
            empty.append(c)
    if not files:
        raise LddpmError(f"{dataset}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {split_dir}")
    if empty:
        raise LddpmError(
            f"{dataset}: class folder {split_dir / empty[0]} has no images"
            + (f" (and {len(empty) - 1} more empty class folders)" if len(empty) > 1 else "")
            + (f"; add images ({'/'.join(IMAGE_EXTENSIONS)}) or remove the folder" if discovered else
               f"; every class of {dataset}'s fixed class list needs images: restore them ({'/'.join(IMAGE_EXTENSIONS)})")
        )
    return RawDataset(
        labels=np.asarray(labels, dtype=np.int64), class_names=list(class_names), mode="RGB",
        sources=_folder_sources(files, split_dir), fingerprint="size+mtime", files=files, root=str(split_dir),
    )


def read_imagenet100(split: str, root: str | os.PathLike | None) -> RawDataset:
    """ImageNet-100 (CMC subset) from `root/{train,val}/<wnid>/*.JPEG`; label = index in the list."""
    if split not in ("train", "val"):
        raise LddpmError(f"unknown split {split!r} for imagenet100; choose 'train' or 'val'")
    if root is None:
        raise LddpmError("imagenet100 needs --root DIR: an ImageNet-1k folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    return read_image_folder(Path(root) / split, imagenet100_classes(), dataset="imagenet100")


def read_imagefolder(split: str, root: str | os.PathLike | None) -> RawDataset:
    """Any `root/<split>/<class>/<image>` tree (or `root/<class>/<image>` for split 'train')."""
    if root is None:
        raise LddpmError("imagefolder needs --root DIR (a folder of class subfolders, or of split folders)")
    root = Path(root)
    if (root / split).is_dir():
        return read_image_folder(root / split)
    if split == "train" and root.is_dir():
        return read_image_folder(root)
    raise LddpmError(f"imagefolder: no split folder {root / split} (and {root} is not usable for split {split!r})")
