"""The joint multimodal transformer (FLUX / MMDiT style) trained with Self-Flow.

One shared network for every modality: per-modality input/output projections and a learned
modality embedding are the only modality-specific parts. Text is a second stream that conditions
through joint attention. Media tokens carry their own noise level (per-token adaLN-Zero, Self-Flow
§3.3), so one sample may mix two levels; the modulation is computed for the distinct levels of a
sample and gathered per token.

Hugging Face interop (huggingface_hub's PyTorchModelHubMixin): `model.save_pretrained(folder)` writes
`model.safetensors` and `config.json` = {"params": <the MMDiTParams fields>}, the constructor's one
argument; `MMDiT.from_pretrained(folder)` rebuilds the model from them (an unknown, missing or mistyped
field is an error, and every weight must be in the file). `push_to_hub` comes with the mixin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfflow.models.attention import Ragged, check_backend, ragged_rows, ragged_segments
from selfflow.models.blocks import DoubleStreamBlock, FinalLayer, SingleStreamBlock
from selfflow.models.flow import velocity_from_data
from selfflow.models.layers import EmbedND, Modulation, TimestepEmbedder, distinct_levels
from selfflow.models.packing import Packed

N_AXES = 4  # rotary axes (t, h, w, l); see selfflow.tokenizers.spec
PREDICTIONS = ("velocity", "data")
HUB_TAGS = ("self-flow", "flow-matching", "mmdit", "text-to-image", "text-to-video", "text-to-audio")


@dataclass(frozen=True)
class MMDiTParams:
    hidden_size: int
    num_heads: int
    depth_double: int
    depth_single: int
    mlp_ratio: float
    axes_dim: tuple[int, ...]  # rotary dims per axis (t, h, w, l); sums to the head dim
    media_channels: dict[str, int] = field(default_factory=dict)  # modality -> token channels
    txt_vocab_size: int = 0  # > 0: text ids with embeddings learned from scratch
    txt_feature_dim: int = 0  # > 0: features of a frozen external text encoder
    qkv_bias: bool = True
    rope_theta: float = 10_000.0
    attn_backend: str = "sdpa"
    grad_checkpointing: bool = False
    prediction: str = "velocity"  # what the output layer predicts: velocity | data (returned as velocity)

    @property
    def depth(self) -> int:
        return self.depth_double + self.depth_single

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MMDiTParams:
        """The inverse of `dataclasses.asdict` after a JSON round trip (axes_dim list -> tuple). Unknown,
        missing or mistyped fields raise a ValueError naming them; values are checked by MMDiT itself."""
        if not isinstance(data, Mapping):
            raise ValueError(f"MMDiT params must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        required = {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(data) - set(known)), sorted(required - set(data))
        if unknown or missing:
            raise ValueError(f"MMDiT params: unknown fields {unknown}, missing fields {missing}")
        axes = data["axes_dim"]
        kw = {**data, "axes_dim": tuple(axes) if isinstance(axes, list) else axes}
        hints = get_type_hints(cls)
        bad = [f"{n}={v!r} (want {hints[n]})" for n, v in kw.items() if not _json_type_ok(v, hints[n])]
        if bad:
            raise ValueError(f"MMDiT params: mistyped fields {', '.join(bad)}")
        return cls(**kw)


@dataclass
class MMDiTOutput:
    velocity: dict[str, Tensor] | None  # modality -> [B, L_m, C_m]; None after an early stop
    hidden: dict[int, Tensor]  # block number (1-indexed over all blocks) -> media hidden [B, L, D]


@dataclass
class Condition:
    """What depends on the caption and the token positions only, not on x or t: the sampler computes
    it once (`MMDiT.condition`) and passes it to every step."""

    txt: Tensor  # [B, Lt, D] embedded caption (the null token where the caption is dropped)
    mask: Tensor | None  # [B, Lt] bool, True = real token
    pe: tuple[Tensor, Tensor]  # rotary tables of [text; media] positions
    ragged: Ragged | None = None  # the tokens of [text; media] that attend (None: all of them)


@dataclass
class LevelSlots:
    """Conditioning vectors of the distinct levels and the level of every token (None: all tokens of
    the stream take slot 0 of their part: the text slot, or the single media level)."""

    vec: Tensor  # [B, K', D]
    txt: Tensor | None  # [B, Lt] slot of each text token, None: slot 0
    media: Tensor | None  # [B, L] slot of each media token among vec[:, media_first:], None: the first
    media_first: int  # where the media levels start in vec (1 unpacked, after the text level; 0 packed)

    def joint(self, b: int, lt: int, n: int) -> Tensor:
        """[B, Lt + L] slot of every token of [text; media] in vec."""
        txt = (
            self.txt if self.txt is not None else torch.zeros(b, lt, dtype=torch.long, device=self.vec.device)
        )
        media = self.media if self.media is not None else txt.new_zeros(b, n)
        return torch.cat([txt, media + self.media_first], dim=1)


class MMDiT(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="selfflow",
    license="apache-2.0",
    pipeline_tag="text-to-video",
    tags=list(HUB_TAGS),
    repo_url=None,
):
    def __init__(self, params: MMDiTParams) -> None:
        super().__init__()
        _validate(params)
        self.params = p = params
        d = p.hidden_size
        self.media_in = nn.ModuleDict({m: nn.Linear(c, d) for m, c in p.media_channels.items()})
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m in p.media_channels})
        self.txt_in = (
            nn.Embedding(p.txt_vocab_size, d) if p.txt_vocab_size else nn.Linear(p.txt_feature_dim, d)
        )
        self.null_txt = nn.Parameter(torch.zeros(d))  # the caption-dropped (CFG) text token
        self.time_in = TimestepEmbedder(d)
        self.pe = EmbedND(p.axes_dim, p.rope_theta)
        # Shared modulation (FLUX.2): one adaLN projection per stream type, reused by every block.
        self.img_mod, self.txt_mod, self.single_mod = Modulation(d, 2), Modulation(d, 2), Modulation(d, 1)
        blk = (d, p.num_heads, p.mlp_hidden, p.qkv_bias, p.attn_backend)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*blk) for _ in range(p.depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(*blk) for _ in range(p.depth_single))
        self.final = FinalLayer(d, dict(p.media_channels))
        self._init_weights()

    @classmethod
    def _from_pretrained(
        cls, *, params: MMDiTParams | Mapping[str, Any] | None = None, strict: bool = True, **kw: Any
    ) -> MMDiT:
        """The mixin's loader with config.json's "params" decoded (MMDiTParams.from_json) and strict
        weights: a missing or unexpected tensor in model.safetensors is an error, not a fresh init."""
        if params is None:
            raise ValueError(f"{kw.get('model_id')}: no config.json with 'params' (not a saved MMDiT)")
        if not isinstance(params, MMDiTParams):
            params = MMDiTParams.from_json(params)
        return super()._from_pretrained(params=params, strict=strict, **kw)

    def _init_weights(self) -> None:
        # DiT init: xavier for the transformer and input projections, N(0, 0.02) for embeddings;
        # modulation and output layers stay zero (adaLN-Zero: every block starts as the identity).
        for module in [*self.double_blocks, *self.single_blocks, self.media_in, self.txt_in]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for w in [*self.modality_embed.values(), self.null_txt]:
            nn.init.normal_(w, std=0.02)
        if isinstance(self.txt_in, nn.Embedding):
            nn.init.normal_(self.txt_in.weight, std=0.02)
        for m in self.time_in.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        media: dict[str, Tensor],  # modality -> tokens [B, L_m, C_m], concatenated in this order
        media_ids: Tensor,  # [L, 4] or [B, L, 4] positions (t, h, w, l) of the concatenated media
        t: Tensor,  # [B] one level per sample, [B, L] per token, or [B, K] levels with t_index
        txt: Tensor | None,  # [B, Lt] token ids, or [B, Lt, F] frozen-encoder features; None with cond
        *,
        t_index: Tensor | None = None,  # [B, L] long: level of each media token in t [B, K]
        txt_t: Tensor | None = None,  # [B] level the text stream is modulated with (default: t [B])
        txt_mask: Tensor | None = None,  # [B, Lt] bool, True = real token
        drop_txt: Tensor | None = None,  # [B] (or [B, Lt] per token) bool: the null caption (CFG)
        return_hidden: Sequence[int] = (),
        stop_after: int | None = None,  # run blocks 1..stop_after only, return hidden states only
        cond: Condition | None = None,  # precomputed `condition(...)`: replaces txt, txt_mask, drop_txt
        packed: Packed | None = None,  # several samples per row (models/packing.py)
    ) -> MMDiTOutput:
        img, lengths = self._embed_media(media)
        levels, index = self._levels(t, t_index, img.shape[1])
        c = cond if cond is not None else self._condition(media_ids, txt, txt_mask, drop_txt, packed)
        levels_of = self._level_slots(levels, index, txt_t, packed, c.txt.shape[1])
        img, hidden = self._run_blocks(img, c.txt, levels_of, c.pe, c.ragged, return_hidden, stop_after)
        if stop_after is not None:
            return MMDiTOutput(None, hidden)
        out = self.final(img, levels_of.vec[:, levels_of.media_first :], levels_of.media, lengths)
        if self.params.prediction == "data":
            out = _data_to_velocity(media, out, levels, index)
        return MMDiTOutput(out, hidden)

    def condition(
        self,
        media_ids: Tensor,  # [L, 4] or [B, L, 4]
        txt: Tensor | None,  # [B, Lt] ids or [B, Lt, F] features
        txt_mask: Tensor | None = None,  # [B, Lt]
        drop_txt: Tensor | None = None,  # [B] or [B, Lt] bool
        packed: Packed | None = None,
    ) -> Condition:
        """The caption embedding, its mask and the rotary tables: the step-independent part of forward."""
        return self._condition(media_ids, txt, txt_mask, drop_txt, packed)

    def _condition(
        self,
        media_ids: Tensor,
        txt: Tensor | None,
        txt_mask: Tensor | None,
        drop_txt: Tensor | None,
        packed: Packed | None = None,
    ) -> Condition:  # forward's own call: a sharded (FSDP2) model hooks `condition`, not this
        if txt is None:
            raise ValueError("give txt, or a precomputed cond")
        txt_h, mask = self._embed_text(txt, txt_mask, drop_txt)
        b, n = txt_h.shape[0], media_ids.shape[-2]
        if packed is not None:  # attention within each sample; each caption counts its own positions
            segment = packed.txt_segment if mask is None else torch.where(mask, packed.txt_segment, -1)
            ragged = ragged_segments(torch.cat([segment, packed.media_segment], dim=1))
            ids = torch.cat([packed.txt_ids, media_ids.expand(b, -1, -1)], dim=1)
            return Condition(txt_h, mask, self.pe(ids), ragged)
        ragged = None  # padded caption tokens take no part in attention (models/attention.py)
        if mask is not None:
            ragged = ragged_rows(torch.cat([mask, mask.new_ones(b, n)], dim=1))  # [B, Lt + L]
        return Condition(txt_h, mask, self.pe(_joint_ids(txt_h.shape[1], media_ids, b)), ragged)

    def _level_slots(
        self, levels: Tensor, index: Tensor | None, txt_t: Tensor | None, packed: Packed | None, lt: int
    ) -> LevelSlots:
        """The conditioning vectors of the distinct levels and which one each token takes. Unpacked: the
        text stream's level txt_t [B] first (default: the single level), then the media levels. Packed:
        the media levels only; each text token takes its sample's level (`packed.txt_level`)."""
        if packed is not None:
            if index is None or txt_t is not None:
                raise ValueError("packed rows take t [B, K] with t_index, and no txt_t (packed.txt_level)")
            return LevelSlots(self.time_in(levels), packed.txt_level, index, 0)
        if txt_t is None:
            if levels.shape[1] != 1:
                raise ValueError("per-token levels need an explicit txt_t for the text stream")
            txt_t = levels[:, 0]
        vec = self.time_in(torch.cat([txt_t[:, None], levels], dim=1))  # [B, 1 + K, D]
        return LevelSlots(vec, None, index, 1)

    def _embed_media(self, media: dict[str, Tensor]) -> tuple[Tensor, dict[str, int]]:
        unknown = set(media) - set(self.media_in)
        if unknown or not media:
            raise ValueError(f"media modalities {sorted(media)} not in the model's {sorted(self.media_in)}")
        parts = [self.media_in[m](x) + self.modality_embed[m] for m, x in media.items()]
        return torch.cat(parts, dim=1), {m: x.shape[1] for m, x in media.items()}

    def _levels(self, t: Tensor, t_index: Tensor | None, length: int) -> tuple[Tensor, Tensor | None]:
        """Normalise the three accepted forms of t to (levels [B, K], index [B, L] or None if K == 1)."""
        if t_index is not None:
            if t.dim() != 2 or t_index.shape != (t.shape[0], length):
                raise ValueError(f"t_index {tuple(t_index.shape)} needs t [B, K] and {length} media tokens")
            return t, t_index
        if t.dim() == 1:
            return t[:, None], None
        if t.shape[1] != length:
            raise ValueError(f"per-token t has {t.shape[1]} levels for {length} media tokens")
        levels, index = distinct_levels(t)
        return levels, index if levels.shape[1] > 1 else None

    def _embed_text(
        self, txt: Tensor, txt_mask: Tensor | None, drop_txt: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if (txt.dim() == 2) != bool(self.params.txt_vocab_size):
            kind = "ids [B, Lt]" if self.params.txt_vocab_size else "features [B, Lt, F]"
            raise ValueError(f"this model takes text {kind}, got a tensor of shape {tuple(txt.shape)}")
        h = self.txt_in(txt)  # [B, Lt, D]
        if drop_txt is not None:
            drop = drop_txt.view(h.shape[0], -1)  # [B, 1] per caption or [B, Lt] per token (packed)
            h = torch.where(drop[..., None], self.null_txt.to(h.dtype), h)
            if txt_mask is not None:  # a dropped caption reveals nothing, not even its length
                txt_mask = txt_mask | drop
        return h, txt_mask

    def _run_blocks(
        self,
        img: Tensor,  # [B, L, D]
        txt: Tensor,  # [B, Lt, D]
        slots: LevelSlots,  # per-level conditioning and each token's level
        pe: tuple[Tensor, Tensor],
        ragged: Ragged | None,  # over [text; media]
        return_hidden: Sequence[int],
        stop_after: int | None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        _check_taps(return_hidden, stop_after, self.params.depth)
        lt, vec, first = txt.shape[1], slots.vec, slots.media_first
        img_mod = self.img_mod(vec[:, first:], slots.media)
        txt_mod = self.txt_mod(vec, slots.txt) if slots.txt is not None else self.txt_mod(vec[:, :1], None)
        (single_mod,) = self.single_mod(vec, slots.joint(img.shape[0], lt, img.shape[1]))
        hidden, last = {}, stop_after or self.params.depth
        for i, block in enumerate(self.double_blocks, start=1):
            img, txt = self._call(block, img, txt, img_mod, txt_mod, pe, ragged)
            if i in return_hidden:
                hidden[i] = img
            if i == last:
                return img, hidden
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks, start=self.params.depth_double + 1):
            x = self._call(block, x, single_mod, pe, ragged)
            if i in return_hidden:
                hidden[i] = x[:, lt:]
            if i == last:
                break
        return x[:, lt:], hidden

    def _call(self, block: nn.Module, *args: Any) -> Any:  # the block's own output
        if self.params.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _validate(p: MMDiTParams) -> None:
    if p.hidden_size % p.num_heads:
        raise ValueError(f"hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}")
    head_dim = p.hidden_size // p.num_heads
    if len(p.axes_dim) != N_AXES or sum(p.axes_dim) != head_dim or any(a % 2 for a in p.axes_dim):
        raise ValueError(
            f"axes_dim {p.axes_dim} must be {N_AXES} even sizes summing to the head dim {head_dim}"
        )
    if p.depth < 1 or p.depth_double < 0 or p.depth_single < 0:
        raise ValueError(f"bad depths: double={p.depth_double} single={p.depth_single}")
    if not p.media_channels or any(c <= 0 for c in p.media_channels.values()):
        raise ValueError(f"media_channels must map each modality to a positive size, got {p.media_channels}")
    if bool(p.txt_vocab_size) == bool(p.txt_feature_dim):
        raise ValueError(
            "set exactly one of txt_vocab_size (learned embeddings) and txt_feature_dim (encoder)"
        )
    if p.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {p.mlp_ratio}")
    check_backend(p.attn_backend)
    if p.prediction not in PREDICTIONS:
        raise ValueError(f"prediction {p.prediction!r} is not one of {PREDICTIONS}")


def _json_type_ok(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value fits a field type of MMDiTParams (int is a float, bool is no int)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        return isinstance(value, tuple) and all(_json_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _json_type_ok(k, args[0]) and _json_type_ok(v, args[1]) for k, v in value.items()
        )
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _data_to_velocity(
    x_t: dict[str, Tensor],  # modality -> noisy tokens [B, L_m, C_m]
    x0: dict[str, Tensor],  # modality -> predicted clean tokens [B, L_m, C_m]
    levels: Tensor,  # [B, K]
    index: Tensor | None,  # [B, L] or None when K == 1
) -> dict[str, Tensor]:
    """The velocity each token's data prediction implies at its own level (flow.velocity_from_data)."""
    if index is None:
        return {m: velocity_from_data(x_t[m], x0[m], levels[:, 0]) for m in x0}
    per_token = levels.gather(1, index).split([x.shape[1] for x in x0.values()], dim=1)  # [B, L_m] each
    return {m: velocity_from_data(x_t[m], x0[m], t) for (m, t) in zip(x0, per_token, strict=True)}


def _check_taps(return_hidden: Sequence[int], stop_after: int | None, depth: int) -> None:
    last = depth if stop_after is None else stop_after
    if not 1 <= last <= depth:
        raise ValueError(f"stop_after={stop_after} outside blocks 1..{depth}")
    bad = [i for i in return_hidden if not 1 <= i <= last]
    if bad:
        raise ValueError(f"hidden states {bad} requested outside blocks 1..{last}")


def _joint_ids(txt_len: int, media_ids: Tensor, batch: int) -> Tensor:
    """Positions of [text; media]: text tokens count along the l axis, media ids come from the tokenizers."""
    if media_ids.dim() == 2:
        media_ids = media_ids.unsqueeze(0)
    txt_ids = torch.zeros(1, txt_len, N_AXES, dtype=media_ids.dtype, device=media_ids.device)
    txt_ids[..., N_AXES - 1] = torch.arange(txt_len, device=media_ids.device)
    txt_ids = txt_ids.expand(media_ids.shape[0], -1, -1)
    return torch.cat([txt_ids, media_ids], dim=1).expand(batch, -1, -1)
