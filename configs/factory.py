"""Build the transformer from a resolved Config: the architecture comes from `cfg.model`, the token
widths from the clip spec, the text input size from the text tokenizer or encoder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from selfflow.configs.extras import check
from selfflow.configs.schema import Config, ConfigError, TextConfig
from selfflow.models.mmdit import MMDiT, MMDiTParams
from selfflow.tokenizers.codecs import build_codec
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import MODALITIES


def text_input_size(text: TextConfig) -> tuple[int, int]:
    """(vocab size, feature dim): exactly one is non-zero."""
    if text.tokenizer == "encoder":
        config_file = Path(text.path) / "config.json"
        if not config_file.is_file():
            if text.dim > 0:  # sizing without the encoder
                return 0, text.dim
            raise FileNotFoundError(f"text encoder config not found: {config_file}")
        enc = json.loads(config_file.read_text())
        width = int(enc.get("d_model") or enc["hidden_size"])
        if text.dim and text.dim != width:
            raise ConfigError(f"text.dim={text.dim}, but the encoder at {text.path} has width {width}")
        return 0, width
    from selfflow.tokenizers.text import build_text_tokenizer

    if text.tokenizer != "byte":
        check("encoders")
    return build_text_tokenizer(text.tokenizer, text.path or None).vocab_size, 0


def model_params(cfg: Config) -> MMDiTParams:
    vocab, feature_dim = text_input_size(cfg.text)
    return MMDiTParams(
        **asdict(cfg.model),
        media_channels={m: cfg.spec.token_dim(m) for m in MODALITIES},
        txt_vocab_size=vocab,
        txt_feature_dim=feature_dim,
    )


def build_model(cfg: Config, device: str | torch.device = "cpu") -> MMDiT:
    """The model on `device`; "meta" builds it without allocating (for sizing)."""
    with torch.device(device):
        return MMDiT(model_params(cfg))


TextConditioner = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
"""captions -> (txt [B, Lt] token ids or [B, Lt, F] features, mask [B, Lt] bool), on `device`."""


def build_text_conditioner(text: TextConfig, device: str | torch.device = "cpu") -> TextConditioner:
    """The caption front end the config names: a tokenizer, or a frozen text encoder on `device`."""
    if text.tokenizer != "byte":
        check("encoders")  # MissingExtra: one line from the command, not a traceback
    if text.tokenizer == "encoder":
        from selfflow.tokenizers.text import FrozenTextEncoder

        encoder = FrozenTextEncoder(text.path).to(device)
        return lambda captions: encoder(captions, text.max_len)
    from selfflow.tokenizers.text import build_text_tokenizer

    tok = build_text_tokenizer(text.tokenizer, text.path or None)

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tok.encode(list(captions), text.max_len)
        return ids.to(device), mask.to(device)

    return encode


def build_media_tokenizer(cfg: Config, device: str | torch.device = "cpu") -> MediaTokenizer:
    """Codecs (identity or local diffusers autoencoders, moved to `device`), their gains
    (`codecs.scales`) and the patchifiers of the spec."""
    codecs = {}
    for m in MODALITIES:
        source = getattr(cfg.codecs, m)
        if source != "identity":
            codecs[m] = build_codec(source, m, cfg.spec).to(device)
    return MediaTokenizer(cfg.spec, codecs, cfg.codecs.scales)
