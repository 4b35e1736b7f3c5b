"""Media <-> token sequences for any set of modalities: codec, then patches, then one packed sequence.

Modalities are data here, not code paths: a sample is a dict {modality: tensor} (an image-only
sample has {"image": ...}, a joint clip {"video": ..., "audio": ...}), and the transformer sees the
tokens of all of them, concatenated in dict order, with their position ids.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from selfflow.tokenizers.audio import AudioPatchifier
from selfflow.tokenizers.codecs import Codec, IdentityCodec, check_codec
from selfflow.tokenizers.image import ImagePatchifier
from selfflow.tokenizers.spec import MODALITIES, ClipSpec
from selfflow.tokenizers.video import VideoPatchifier

Patchifier = ImagePatchifier | VideoPatchifier | AudioPatchifier


class MediaTokenizer:
    """Codecs + patchifiers for every modality of one clip spec."""

    def __init__(
        self, spec: ClipSpec, codecs: dict[str, Codec] | None = None, scales: dict[str, float] | None = None
    ) -> None:
        """`scales`: {modality: gain}; tokens are gain * latents (1 where missing)."""
        self.spec = spec
        self.scales = {m: float((scales or {}).get(m, 1.0)) for m in MODALITIES}
        self.patchifiers: dict[str, Patchifier] = {
            "image": ImagePatchifier(spec),
            "video": VideoPatchifier(spec),
            "audio": AudioPatchifier(spec),
        }
        self.codecs: dict[str, Codec] = dict(codecs or {})
        for m, codec in self.codecs.items():
            check_codec(codec, m, spec)

    def codec(self, modality: str) -> Codec:
        """The modality's codec; identity unless one was given (checked against the spec on first use)."""
        if modality not in self.codecs:
            pixels = self.spec.audio_channels if modality == "audio" else self.spec.video_channels
            check_codec(IdentityCodec(pixels), modality, self.spec)
            self.codecs[modality] = IdentityCodec(pixels)
        return self.codecs[modality]

    def token_channels(self) -> dict[str, int]:
        """Token width per modality, what the transformer's input/output projections need."""
        return {m: self.spec.token_dim(m) for m in MODALITIES}

    def position_ids(self, modalities: list[str]) -> Tensor:
        """[L, 4] positions of the packed sequence of these modalities, in this order."""
        return torch.cat([self.patchifiers[m].position_ids() for m in modalities])

    def encode(
        self, media: dict[str, Tensor], latents: Collection[str] = ()
    ) -> tuple[dict[str, Tensor], Tensor]:
        """{modality: media} -> ({modality: tokens [B, L_m, C_m]}, ids [L, 4]). The modalities in
        `latents` hold the codec's latents already (stored in shards): they skip the codec."""
        tokens = {
            m: self.patchifiers[m].patchify(self._gain(m, x if m in latents else self.codec(m).encode(x)))
            for m, x in media.items()
        }
        return tokens, self.position_ids(list(media))

    def decode(self, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """{modality: tokens} -> {modality: media}."""
        return {
            m: self.codec(m).decode(self._gain(m, self.patchifiers[m].unpatchify(z), inverse=True))
            for m, z in tokens.items()
        }

    def _gain(self, modality: str, latents: Tensor, inverse: bool = False) -> Tensor:
        """gain * latents (latents / gain when decoding); a gain of 1 costs nothing."""
        gain = self.scales[modality]
        if gain == 1.0:
            return latents
        return latents / gain if inverse else latents * gain
