"""Tests for selfflow.tokenizers.text and tools/train_text_tokenizer.py (CPU, offline)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow.tokenizers.text import (
    ByteTokenizer,
    FrozenTextEncoder,
    SentencePieceTokenizer,
    TextTokenizer,
    build_text_tokenizer,
    train_sentencepiece,
)

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def make_captions(n: int = 200, seed: int = 0) -> list[str]:
    """Small synthetic caption corpus."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    things = ["ball", "cube", "square", "circle", "the digit 3", "the digit 7", "a cat"]
    verbs = ["bounces", "moves left", "moves right", "spins", "falls down", "rises slowly"]
    return [f"a {rng.choice(colors)} {rng.choice(things)} {rng.choice(verbs)}" for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(make_captions()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_model(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece([corpus], tmp_path_factory.mktemp("spm") / "caps", vocab_size=64)


# --- byte tokenizer -------------------------------------------------------------------------------------


def test_byte_round_trip() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, TextTokenizer)
    assert tok.vocab_size == 259 and tok.pad_id == 0
    texts = ["a red ball bounces", "héllo wörld – 数字 3 🎈"]
    ids, mask = tok.encode(texts, 64)
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert [tok.decode(row) for row in ids] == texts
    assert tok.decode(ids[0].tolist()) == texts[0]
    assert int(ids.max()) < tok.vocab_size


def test_byte_padding_mask_truncation() -> None:
    tok = ByteTokenizer()
    ids, mask = tok.encode(["ab", "abcdefgh"], 6)
    assert ids[0].tolist() == [1, ord("a") + 3, ord("b") + 3, 2, 0, 0]
    assert mask[0].tolist() == [True] * 4 + [False] * 2
    # Truncation keeps BOS first and EOS last, dropping content.
    assert ids[1].tolist() == [1, *(ord(c) + 3 for c in "abcd"), 2]
    assert mask[1].all()
    assert tok.decode(ids[1]) == "abcd"
    with pytest.raises(ValueError):
        tok.encode(["x"], 1)


def test_byte_empty_string() -> None:
    ids, mask = ByteTokenizer().encode([""], 4)
    assert ids[0].tolist() == [1, 2, 0, 0]
    assert mask[0].tolist() == [True, True, False, False]
    assert ByteTokenizer().decode(ids[0]) == ""


def test_build_text_tokenizer(sp_model: Path) -> None:
    assert isinstance(build_text_tokenizer("byte"), ByteTokenizer)
    assert isinstance(build_text_tokenizer("sentencepiece", str(sp_model)), SentencePieceTokenizer)
    with pytest.raises(ValueError, match="wordpiece"):
        build_text_tokenizer("wordpiece")
    with pytest.raises(ValueError):
        build_text_tokenizer("sentencepiece")


# --- sentencepiece --------------------------------------------------------------------------------------


def test_sentencepiece_round_trip(sp_model: Path) -> None:
    assert sp_model.name == "caps.model" and sp_model.with_suffix(".vocab").is_file()
    assert not [p for p in sp_model.parent.iterdir() if p.name.startswith(".spm-train-")]
    tok = SentencePieceTokenizer(sp_model)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    texts = ["a red ball bounces", "a blue the digit 3 moves left", ""]
    ids, mask = tok.encode(texts, 48)
    assert ids.shape == mask.shape == (3, 48)
    assert [tok.decode(row) for row in ids] == texts
    assert ids[2, :2].tolist() == [2, 3] and not mask[2, 2:].any()
    assert int(ids.max()) < tok.vocab_size
    short, short_mask = tok.encode(["a yellow circle rises slowly"], 5)
    assert short[0, 0] == tok.bos_id and short[0, -1] == tok.eos_id and short_mask.all()


def test_sentencepiece_deterministic(corpus: Path, sp_model: Path, tmp_path: Path) -> None:
    again = train_sentencepiece([corpus], tmp_path / "again", vocab_size=64)
    assert again.read_bytes() == sp_model.read_bytes()
    assert again.with_suffix(".vocab").read_bytes() == sp_model.with_suffix(".vocab").read_bytes()


def test_sentencepiece_sidecars_and_bpe(tmp_path: Path) -> None:
    files = []
    for i, cap in enumerate(make_captions(50, seed=1)):
        files.append(tmp_path / f"clip{i:03d}.txt")
        files[-1].write_text(cap, encoding="utf-8")
    model = train_sentencepiece(files, tmp_path / "out" / "bpe", vocab_size=60, model_type="bpe")
    tok = SentencePieceTokenizer(model)
    ids, _ = tok.encode(["a green cube spins"], 32)
    assert tok.decode(ids[0]) == "a green cube spins"


def test_sentencepiece_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        SentencePieceTokenizer(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no captions"):
        train_sentencepiece([empty], tmp_path / "x", vocab_size=32)


# --- CLI ------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "tools/train_text_tokenizer.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)


def test_cli_success(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sidecars"
    folder.mkdir()
    (folder / "extra.txt").write_text("a white square falls down", encoding="utf-8")
    out = tmp_path / "tok" / "captions"
    res = run_cli("--captions", str(corpus), str(folder), "--out", str(out), "--vocab-size", "64")
    assert res.returncode == 0, res.stderr
    model = Path(res.stdout.strip().splitlines()[-1])
    assert model == out.with_name("captions.model") and model.is_file()
    assert out.with_name("captions.vocab").is_file()
    tok = SentencePieceTokenizer(model)
    ids, _ = tok.encode(["a white square falls down"], 32)
    assert tok.decode(ids[0]) == "a white square falls down"


@pytest.mark.parametrize("kind", ["missing", "empty_folder"])
def test_cli_bad_input(kind: str, tmp_path: Path) -> None:
    src = tmp_path / "nope.txt"
    if kind == "empty_folder":
        src = tmp_path / "empty"
        src.mkdir()
    out_dir = tmp_path / "out"
    res = run_cli("--captions", str(src), "--out", str(out_dir / "tok"), "--vocab-size", "64")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert str(src) in err
    assert not out_dir.exists()
    assert res.stdout == ""


def test_cli_bad_vocab_size(corpus: Path, tmp_path: Path) -> None:
    res = run_cli("--captions", str(corpus), "--out", str(tmp_path / "out" / "tok"), "--vocab-size", "3")
    assert res.returncode == 2 and "vocab_size" in res.stderr
    assert not (tmp_path / "out").exists()


# --- frozen pretrained encoder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer T5 encoder + T5 tokenizer saved to a local directory, built offline."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spm_dir = tmp_path_factory.mktemp("t5spm")
    # T5 convention: pad=0, eos=1, unk=2, no bos.
    spm.SentencePieceTrainer.Train(
        input=str(corpus),
        model_prefix=str(spm_dir / "spiece"),
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tok = T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_t5")
    T5EncoderModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_frozen_text_encoder(tiny_t5_dir: Path) -> None:
    enc = FrozenTextEncoder(tiny_t5_dir)
    assert enc.feature_dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    texts = ["a red ball bounces", "", "a black cube moves right and then a blue circle spins"]
    feats, mask = enc(texts, 20)
    assert feats.shape == (3, 20, 32) and mask.shape == (3, 20) and mask.dtype == torch.bool
    assert not feats.requires_grad
    assert mask[1].sum() == 1 and mask[1, 0]  # empty text is just </s>
    assert mask[2].all()  # truncated to max_len
    assert mask[0, 0] and not mask[0].all()
    assert (feats[~mask] == 0).all() and feats[mask].abs().sum() > 0
    again, mask2 = enc(texts, 20)
    assert torch.equal(feats, again) and torch.equal(mask, mask2)


def test_frozen_text_encoder_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        FrozenTextEncoder(tmp_path / "no_such_encoder")


# --- coexistence with Hugging Face `tokenizers` ---------------------------------------------------------

COEXIST_SNIPPET = """
import selfflow.tokenizers.text as text
import tokenizers
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

assert "site-packages" in tokenizers.__file__, tokenizers.__file__
vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2, "red": 3, "ball": 4}
backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
assert fast("a red ball cat")["input_ids"] == [2, 3, 4, 0], fast("a red ball cat")
ids, mask = text.ByteTokenizer().encode(["ok"], 4)
assert ids.tolist() == [[1, 111 + 3, 107 + 3, 2]]
print("coexist-ok", tokenizers.__file__)
"""


def test_hf_tokenizers_coexist_in_process() -> None:
    import selfflow.tokenizers.text  # noqa: F401  (imported first on purpose)

    exec(compile(COEXIST_SNIPPET, "<coexist>", "exec"), {})
    import tokenizers

    assert "site-packages" in tokenizers.__file__
    assert not Path(tokenizers.__file__).resolve().is_relative_to(REPO / "tokenizers")


def test_hf_tokenizers_coexist_from_repo_root() -> None:
    res = subprocess.run(
        [sys.executable, "-c", COEXIST_SNIPPET],
        cwd=REPO,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "coexist-ok" in res.stdout
