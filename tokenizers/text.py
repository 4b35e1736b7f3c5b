"""Text tokenizers and a frozen pretrained text encoder for caption conditioning.

Two trainable-model-friendly tokenizers share one small interface (:class:`TextTokenizer`):

* :class:`ByteTokenizer`: UTF-8 bytes, nothing to train. ``pad=0, bos=1, eos=2``, byte ``b -> b + 3``.
* :class:`SentencePieceTokenizer`: a sentencepiece ``.model`` trained by :func:`train_sentencepiece`
  (``pad=0, unk=1, bos=2, eos=3``; other models are read with their own special ids).

``encode`` always returns ``[BOS, tokens..., EOS, PAD...]``. Truncation drops *content* tokens, so a
sequence always starts with BOS and always ends with EOS (``max_len >= 2``). The empty caption encodes to
``[BOS, EOS]``; the "null caption" used for classifier-free guidance is the model's business, not ours.

:class:`FrozenTextEncoder` wraps a Hugging Face encoder (e.g. T5) loaded from a local directory; it is
never trained. ``transformers`` is imported lazily so this module stays cheap to import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "ByteTokenizer",
    "FrozenTextEncoder",
    "SentencePieceTokenizer",
    "TextTokenizer",
    "build_text_tokenizer",
    "iter_captions",
    "train_sentencepiece",
]


@runtime_checkable
class TextTokenizer(Protocol):
    """What the model needs from a text tokenizer."""

    vocab_size: int
    pad_id: int

    def encode(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Return ids LongTensor [B, max_len] and bool mask [B, max_len] (True = real token)."""
        ...

    def decode(self, ids: Tensor | list[int]) -> str:
        """Return the text of one sequence, without specials and padding."""
        ...


def _pack(seqs: list[list[int]], max_len: int, bos: int | None, eos: int, pad: int) -> tuple[Tensor, Tensor]:
    """Frame each content sequence as [BOS] + content + [EOS], truncate content, right-pad.

    Returns ids [B, max_len] (int64) and mask [B, max_len] (bool).
    """
    n_special = 2 if bos is not None else 1
    if max_len < n_special:
        raise ValueError(f"max_len must be >= {n_special} to hold BOS/EOS, got {max_len}")
    ids = torch.full((len(seqs), max_len), pad, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(seqs), max_len), dtype=torch.bool)  # [B, L]
    for i, content in enumerate(seqs):
        head = [bos] if bos is not None else []
        row = head + content[: max_len - n_special] + [eos]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def _as_list(ids: Tensor | list[int]) -> list[int]:
    """Flatten a 1-D tensor (or [1, L]) / list of ids into a python list."""
    if isinstance(ids, Tensor):
        if ids.dim() > 1 and ids.shape[0] != 1:
            raise ValueError(f"decode takes one sequence, got ids of shape {tuple(ids.shape)}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


class ByteTokenizer:
    """UTF-8 byte tokenizer: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab_size 259)."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    offset: int = 3
    vocab_size: int = 256 + 3

    def encode(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Encode texts to ids [B, max_len] and mask [B, max_len]; see the module doc for framing."""
        seqs = [[b + self.offset for b in t.encode("utf-8")] for t in texts]
        return _pack(seqs, max_len, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Decode one sequence; specials are dropped and a cut multi-byte char becomes U+FFFD."""
        data = bytes(i - self.offset for i in _as_list(ids) if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained sentencepiece model; special ids come from the model itself.

    Models from :func:`train_sentencepiece` use pad=0, unk=1, bos=2, eos=3. A model without a pad or eos
    piece is rejected; a model without bos (e.g. T5's) encodes as ``tokens..., EOS``.
    """

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"not a valid sentencepiece model: {path} ({e})") from None
        self.model_path = path
        self.vocab_size: int = int(self.sp.GetPieceSize())
        self.pad_id: int = int(self.sp.pad_id())
        self.eos_id: int = int(self.sp.eos_id())
        self.unk_id: int = int(self.sp.unk_id())
        bos = int(self.sp.bos_id())
        self.bos_id: int | None = bos if bos >= 0 else None
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} needs pad and eos pieces (pad_id/eos_id >= 0)")

    def encode(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Encode texts to ids [B, max_len] and mask [B, max_len]; see the module doc for framing."""
        seqs = [list(s) for s in self.sp.EncodeAsIds(list(texts))]
        return _pack(seqs, max_len, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Decode one sequence; pad/bos/eos and out-of-range ids are dropped (unk stays as ' ⁇ ')."""
        special = {self.pad_id, self.eos_id, self.bos_id}
        return self.sp.DecodeIds([i for i in _as_list(ids) if i not in special and 0 <= i < self.vocab_size])


def iter_captions(caption_files: list[Path]) -> Iterator[str]:
    """Yield the non-empty, stripped lines of each file, in the order given.

    A caption-list file gives one caption per line; a ``.txt`` sidecar (one caption per file) gives its
    caption, with any inner newlines acting as sentence breaks, which is harmless for tokenizer training.
    """
    for f in caption_files:
        for line in Path(f).read_text(encoding="utf-8", errors="replace").splitlines():
            if line := line.strip():
                yield line


def _write_vocab(model_path: Path, vocab_path: Path) -> None:
    """Write the ``piece<TAB>score`` listing that ``spm_train`` writes next to a model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    lines = [f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize())]
    vocab_path.write_text("".join(lines), encoding="utf-8")


def train_sentencepiece(
    caption_files: list[Path],
    out_prefix: Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    num_threads: int = 1,
) -> Path:
    """Train a sentencepiece model on caption files and write ``<out_prefix>.model`` / ``.vocab``.

    Special ids: pad=0, unk=1, bos=2, eos=3. ``hard_vocab_limit=False`` lets tiny corpora train (the
    vocab may come out smaller than asked). Files are trained in a temp dir next to the output and
    renamed into place, so a failure leaves nothing behind. The model records no paths, so the same
    input gives identical bytes (with ``num_threads=1``). Returns the ``.model`` path.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size <= 4:
        raise ValueError(f"vocab_size must be > 4 (pad/unk/bos/eos are reserved), got {vocab_size}")
    captions = list(iter_captions([Path(f) for f in caption_files]))
    if not captions:
        raise ValueError("no captions found in the given files")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".spm-train-", dir=out_prefix.parent))
    try:
        model_bytes = _SerializedModel()
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(captions),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            num_threads=num_threads,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        tmp_model, tmp_vocab = tmp / "m.model", tmp / "m.vocab"
        tmp_model.write_bytes(model_bytes.data)
        _write_vocab(tmp_model, tmp_vocab)
        model_path = out_prefix.with_name(out_prefix.name + ".model")
        os.replace(tmp_vocab, out_prefix.with_name(out_prefix.name + ".vocab"))
        os.replace(tmp_model, model_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_path


class _SerializedModel:
    """``model_writer`` sink for ``SentencePieceTrainer.Train``: keeps the serialized model bytes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def build_text_tokenizer(kind: str, path: str | None = None) -> TextTokenizer:
    """Build a tokenizer by name: ``"byte"`` or ``"sentencepiece"`` (needs ``path`` to a ``.model``)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if path is None:
            raise ValueError("text tokenizer 'sentencepiece' needs a model path")
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown text tokenizer kind {kind!r}; expected 'byte' or 'sentencepiece'")


_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class FrozenTextEncoder(nn.Module):
    """A pretrained Hugging Face text encoder (+ its tokenizer) from a local directory, always frozen.

    T5-family configs load only the encoder stack; other configs load ``AutoModel`` (and its encoder when
    the model is encoder-decoder). Parameters have ``requires_grad=False`` and the module stays in eval
    mode even under ``.train()``.
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        import transformers

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls_name = _T5_ENCODERS.get(config.model_type)
        cls = getattr(transformers, cls_name) if cls_name else transformers.AutoModel
        model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=dtype)
        if cls_name is None and getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = model
        self.model.requires_grad_(False)
        self.train(False)
        self._feature_dim = int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def feature_dim(self) -> int:
        """Width F of the returned features (config ``d_model`` or ``hidden_size``)."""
        return self._feature_dim

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Ignore ``mode``: the encoder is never trained, so it always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Encode texts to features [B, max_len, F] (zero at padding) and bool mask [B, max_len]."""
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids = tok["input_ids"].to(device)  # [B, L]
        mask = tok["attention_mask"].to(device).bool()  # [B, L]
        feats = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [B, L, F]
        return feats * mask.unsqueeze(-1).to(feats.dtype), mask
