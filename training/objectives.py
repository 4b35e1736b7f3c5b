"""Training objectives side by side, one signature (the shape of REPA's `loss.py`):

    objective(models, batch, generator, cfg) -> ObjectiveOutput(loss [B], levels [B, K], metrics)

No optimizer, device or precision logic in here. Every random draw comes from `generator`, in a fixed
order (t, then eps, then the caption-dropout decision, then objective-specific draws), so objectives
that coincide in a limit coincide on the same generator. Levels follow `selfflow.models.flow`
(t = 1 is noise). Baselines are objectives, not forks:

- vanilla:   flow matching with one level per sample.
- dts_only:  Self-Flow's dual-timestep noising, no representation loss, no teacher forward.
- self_flow: dual-timestep noising + alignment of a student layer (through a projector) to the EMA
             teacher's deeper layer on the same sample noised at the cleaner level (Self-Flow §3).
- sra:       one level; the EMA teacher sees t - U(0, 0.2) (SRA, arXiv 2505.02831).
- repa:      one level; alignment to a frozen external encoder's features (REPA, arXiv 2410.06940).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.configs.schema import ObjectiveConfig
from selfflow.models import flow
from selfflow.models.heads import ProjectorHead, REPAProjector
from selfflow.models.mmdit import MMDiT, MMDiTOutput
from selfflow.models.packing import Packed

DEFAULT_GAMMA = {"vanilla": 0.0, "dts_only": 0.0, "self_flow": 0.8, "sra": 0.5, "repa": 0.5}


@dataclass
class Batch:
    media: dict[str, Tensor]  # clean tokens x0 per modality [B, L_m, C_m], packed in this order
    ids: Tensor  # [L, 4] positions of the packed media tokens
    txt: Tensor  # [B, Lt] token ids (or [B, Lt, F] encoder features)
    txt_mask: Tensor | None = None  # [B, Lt] bool
    task: str = "image"  # image | video | audio | av: selects p(t)
    # several samples in one row (models/packing.py): then media, ids, txt are that row's ([1, ...])
    packed: Packed | None = None
    sample_tasks: tuple[str, ...] = ()  # packed: each sample's task, in sample order

    @property
    def samples(self) -> int:
        return len(self.sample_tasks) if self.packed is not None else self.txt.shape[0]

    @property
    def tokens(self) -> int:
        """Media tokens + caption slots the model processes for this batch."""
        rows = self.txt.shape[0]
        return rows * (sum(x.shape[1] for x in self.media.values()) + self.txt.shape[1])


@dataclass
class Models:
    student: MMDiT
    head: nn.Module | None = None  # projector on the student's layer l (self_flow, sra, repa)
    teacher: MMDiT | None = None  # the EMA model (self_flow, sra); never receives gradients
    # REPA target (frozen): clean media tokens {modality: [B, L_m, C_m]} -> features [B, L, F] per token
    encoder: Callable[[dict[str, Tensor]], Tensor] | None = None


@dataclass
class ObjectiveOutput:
    loss: Tensor  # [B] per-sample total loss (packed: [samples])
    levels: Tensor  # [B, K] the sampled levels: (t,) or (t, s) per sample
    metrics: dict[str, Tensor] = field(default_factory=dict)  # batch means, kept on device
    loss_gen: Tensor | None = None  # [B] per-sample velocity loss (for loss-per-t-bin logging)


def alignment_layers(depth: int) -> tuple[int, int]:
    """Student / teacher blocks round(0.3 depth), round(0.7 depth), halves rounded up (28 -> 8, 20)."""
    return max(1, math.floor(0.3 * depth + 0.5)), max(1, math.floor(0.7 * depth + 0.5))


def _layers(cfg: ObjectiveConfig, depth: int) -> tuple[int, int]:
    student, teacher = alignment_layers(depth)
    return cfg.student_layer or student, cfg.teacher_layer or teacher


def _gamma(cfg: ObjectiveConfig, name: str) -> float:
    return cfg.gamma if cfg.gamma >= 0 else DEFAULT_GAMMA[name]


def make_head(name: str, dim: int, feature_dim: int = 0) -> nn.Module | None:
    """The projector an objective trains alongside the model (None for vanilla / dts_only)."""
    if name in ("self_flow", "sra"):
        return ProjectorHead(dim)
    if name == "repa":
        if feature_dim <= 0:
            raise ValueError("repa needs the external encoder's feature width")
        return REPAProjector(dim, feature_dim)
    return None


# ---------------------------------------------------------------- shared pieces


def sample_levels(batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> Tensor:
    """One level per sample [B] from its task's p(t) (packed: sample by sample)."""
    if batch.packed is None:
        return cfg.timesteps[batch.task].sample((batch.samples,), generator=gen, device=gen.device)
    return torch.cat(
        [cfg.timesteps[task].sample((1,), generator=gen, device=gen.device) for task in batch.sample_tasks]
    )


def _common_draws(batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> tuple[Tensor, dict, Tensor]:
    """t [B] from the task's p(t), eps per modality, and the caption-dropout decision [B] bool."""
    t = sample_levels(batch, gen, cfg)
    eps = {
        m: torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype)
        for m, x in batch.media.items()
    }
    drop = torch.rand(batch.samples, generator=gen, device=gen.device) < cfg.caption_dropout
    return t, eps, drop


def _model_inputs(
    batch: Batch, levels: Tensor, index: Tensor | None, drop: Tensor
) -> tuple[Tensor, Tensor, dict]:
    """(the noise level of every sample [B] or token [B, L], the model's t, its other keyword arguments)
    for levels [B, K] and the per-token choice among each sample's K levels index [B, L] (None: K == 1)."""
    if batch.packed is None:
        tau = levels[:, 0] if index is None else levels.gather(1, index)  # [B] or [B, L]
        txt_t = None if index is None else levels[:, 0]
        t = levels[:, 0] if index is None else levels
        return tau, t, dict(t_index=index, txt_t=txt_t, txt_mask=batch.txt_mask, drop_txt=drop)
    k = levels.shape[1]
    flat = levels.reshape(1, -1)  # [1, n K]
    t_index = batch.packed.media_segment * k + (index if index is not None else 0)  # [1, L]
    packed = replace(batch.packed, levels_per_sample=k)
    drop_slots = drop[batch.packed.txt_segment.clamp(min=0)]  # [1, Lt]: each caption slot, its sample's
    kwargs = dict(t_index=t_index, txt_mask=batch.txt_mask, drop_txt=drop_slots, packed=packed)
    return flat.gather(1, t_index), flat, kwargs


def _per_sample(batch: Batch, per_token: Tensor, weight: Tensor) -> Tensor:
    """Packed: per-token sums [1, L] and their weights [1, L] -> per-sample weighted means [samples]."""
    segment = batch.packed.media_segment[0]
    zeros = per_token.new_zeros(batch.samples)
    return zeros.index_add(0, segment, per_token[0]) / zeros.index_add(0, segment, weight[0])


def _noised(x0: dict[str, Tensor], eps: dict[str, Tensor], tau: Tensor) -> dict[str, Tensor]:
    """Noise every modality at levels tau: [B] per sample, or [B, L] per packed token."""
    if tau.dim() == 1:
        return {m: flow.interpolate(x, eps[m], tau) for m, x in x0.items()}
    parts = tau.split([x.shape[1] for x in x0.values()], dim=1)
    return {m: flow.interpolate(x, eps[m], p) for (m, x), p in zip(x0.items(), parts, strict=True)}


def velocity_mse(
    pred: dict[str, Tensor], x0: dict[str, Tensor], eps: dict[str, Tensor], batch: Batch | None = None
) -> Tensor:
    """Per-sample mean squared velocity error over every media token and channel -> [B] (a packed
    `batch`: per sample of its row)."""
    if batch is not None and batch.packed is not None:
        sq = torch.cat([(pred[m].float() - flow.velocity_target(x, eps[m]).float()).pow(2).sum(-1)
                        for m, x in x0.items()], dim=1)  # fmt: skip
        channels = torch.cat([torch.full(x.shape[:2], x.shape[2], device=sq.device) for x in x0.values()], 1)
        return _per_sample(batch, sq, channels.float())
    sq = sum(
        (pred[m].float() - flow.velocity_target(x, eps[m]).float()).pow(2).flatten(1).sum(1)
        for m, x in x0.items()
    )
    return sq / sum(x[0].numel() for x in x0.values())


def cosine_to_target(pred: Tensor, target: Tensor, batch: Batch | None = None) -> Tensor:
    """Per-sample mean over tokens of cos(pred_i, target_i) over the hidden dim -> [B] (Self-Flow Eq. 6;
    a packed `batch`: per sample of its row)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, L]
    if batch is not None and batch.packed is not None:
        return _per_sample(batch, cos, torch.ones_like(cos))
    return cos.mean(1)


def _teacher_alignment(
    models: Models,
    batch: Batch,
    x0: dict,
    eps: dict,
    tau: Tensor,
    drop: Tensor,
    student_hidden: Tensor,
    k: int,
) -> Tensor:
    """cos [B] between the projected student hidden state and the EMA teacher's block-k hidden state,
    the teacher seeing the same x0 and eps noised uniformly at tau [B] (its text stream at tau too)."""
    if models.teacher is None or models.head is None:
        raise ValueError("this objective needs models.teacher (the EMA) and models.head")
    token_tau, t, kwargs = _model_inputs(batch, tau[:, None], None, drop)
    with torch.no_grad():
        noised = _noised(x0, eps, token_tau)
        target = models.teacher(noised, batch.ids, t, batch.txt, return_hidden=(k,), stop_after=k, **kwargs)
    return cosine_to_target(models.head(student_hidden), target.hidden[k], batch)  # target [B, L, D]


def _output(
    name: str, cfg: ObjectiveConfig, loss_gen: Tensor, cos: Tensor | None, levels: Tensor
) -> ObjectiveOutput:
    loss_rep = torch.zeros_like(loss_gen) if cos is None else 1.0 - cos
    loss = loss_gen + _gamma(cfg, name) * loss_rep if cos is not None else loss_gen
    metrics = {"loss": loss.mean(), "loss_gen": loss_gen.mean(), "loss_rep": loss_rep.mean()}
    if cos is not None:
        metrics["rep_cos"] = cos.mean()
    return ObjectiveOutput(loss, levels, metrics, loss_gen.detach())


def _student_forward(
    models: Models,
    batch: Batch,
    eps: dict,
    levels: Tensor,
    drop: Tensor,
    index: Tensor | None = None,
    hidden: tuple[int, ...] = (),
) -> MMDiTOutput:
    """The student on the batch noised at levels [B] (or [B, K] with a per-token index [B, L]); its text
    stream is modulated with the base level t = levels[:, 0]."""
    tau, t, kwargs = _model_inputs(batch, levels if levels.dim() == 2 else levels[:, None], index, drop)
    return models.student(
        _noised(batch.media, eps, tau), batch.ids, t, batch.txt, return_hidden=hidden, **kwargs
    )


# ---------------------------------------------------------------- the objectives


def vanilla(models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> ObjectiveOutput:
    t, eps, drop = _common_draws(batch, gen, cfg)
    out = _student_forward(models, batch, eps, t, drop)
    return _output("vanilla", cfg, velocity_mse(out.velocity, batch.media, eps, batch), None, t[:, None])


def draw_second_level(
    batch: Batch, t: Tensor, gen: torch.Generator, cfg: ObjectiveConfig
) -> tuple[Tensor, Tensor]:
    """Self-Flow's second level s [B] ~ p(t), drawn independently of t (not sorted), and the token mask
    [B, L] bool: each media token takes s with its modality's probability R_M (Bernoulli), else t."""
    s = sample_levels(batch, gen, cfg)
    mask = [
        torch.rand(x.shape[:2], generator=gen, device=gen.device) < cfg.mask_ratio[m]
        for m, x in batch.media.items()
    ]
    return s, torch.cat(mask, dim=1)


def _dual_timestep(
    name: str, models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig
) -> ObjectiveOutput:
    """Dual-timestep scheduling (Self-Flow §3.3, Eq. 4-5), with the teacher alignment for self_flow."""
    t, eps, drop = _common_draws(batch, gen, cfg)
    s, mask = draw_second_level(batch, t, gen, cfg)
    levels, index = torch.stack([t, s], dim=1), mask.long()  # [B, 2], [B, L]
    ls, k = _layers(cfg, models.student.params.depth)
    with_teacher = name == "self_flow"
    out = _student_forward(models, batch, eps, levels, drop, index, hidden=(ls,) if with_teacher else ())
    cos = None
    if with_teacher:
        tau = flow.cleaner_level(t, s)
        cos = _teacher_alignment(models, batch, batch.media, eps, tau, drop, out.hidden[ls], k)
    result = _output(name, cfg, velocity_mse(out.velocity, batch.media, eps, batch), cos, levels)
    result.metrics["mask_frac"] = mask.float().mean()
    return result


def dts_only(models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> ObjectiveOutput:
    return _dual_timestep("dts_only", models, batch, gen, cfg)


def self_flow(models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> ObjectiveOutput:
    return _dual_timestep("self_flow", models, batch, gen, cfg)


def draw_gap(t: Tensor, gen: torch.Generator, cfg: ObjectiveConfig) -> Tensor:
    """SRA's teacher offset [B] ~ U(0, sra_max_gap): the teacher sees t - gap."""
    return torch.rand(t.shape, generator=gen, device=gen.device) * cfg.sra_max_gap


def sra(models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> ObjectiveOutput:
    t, eps, drop = _common_draws(batch, gen, cfg)
    gap = draw_gap(t, gen, cfg)
    ls, k = _layers(cfg, models.student.params.depth)
    out = _student_forward(models, batch, eps, t, drop, hidden=(ls,))
    cos = _teacher_alignment(
        models, batch, batch.media, eps, (t - gap).clamp(0.0, 1.0), drop, out.hidden[ls], k
    )
    return _output("sra", cfg, velocity_mse(out.velocity, batch.media, eps, batch), cos, t[:, None])


def repa(models: Models, batch: Batch, gen: torch.Generator, cfg: ObjectiveConfig) -> ObjectiveOutput:
    if models.encoder is None or models.head is None:
        raise ValueError("repa needs models.encoder (frozen features on the token grid) and models.head")
    t, eps, drop = _common_draws(batch, gen, cfg)
    ls, _ = _layers(cfg, models.student.params.depth)
    out = _student_forward(models, batch, eps, t, drop, hidden=(ls,))
    with torch.no_grad():
        target = _encoder_features(models.encoder, batch)  # [B, L, F]
    cos = cosine_to_target(models.head(out.hidden[ls]), target, batch)
    # REPA's loss is mean(-cos); 1 - cos has the same gradient and keeps loss_rep >= 0 in the logs.
    return _output("repa", cfg, velocity_mse(out.velocity, batch.media, eps, batch), cos, t[:, None])


def _encoder_features(encoder: Callable[[dict[str, Tensor]], Tensor], batch: Batch) -> Tensor:
    """REPA's targets [B, L, F]. A packed row is split back into its samples per modality (the encoder
    reads whole images and clips), then the features are laid out as the row's tokens."""
    if batch.packed is None:
        return encoder(batch.media)
    parts, start = [], 0
    for m, x in batch.media.items():  # x [1, n_m L_m, C]: the n_m samples with modality m, in order
        samples = int(batch.packed.media_segment[0, start : start + x.shape[1]].unique().numel())
        start += x.shape[1]
        features = encoder({m: x.reshape(samples, x.shape[1] // samples, x.shape[2])})  # [n_m, L_m, F]
        parts.append(features.reshape(1, -1, features.shape[-1]))
    return torch.cat(parts, dim=1)


OBJECTIVES: dict[str, Callable[[Models, Batch, torch.Generator, ObjectiveConfig], ObjectiveOutput]] = {
    "vanilla": vanilla,
    "dts_only": dts_only,
    "self_flow": self_flow,
    "sra": sra,
    "repa": repa,
}
