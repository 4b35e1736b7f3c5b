"""Parameters, tokens and training FLOPs of a preset (tools/model_info.py prints them):

    python tools/model_info.py configs/4b.yaml [key=value ...]

The model is built on the meta device. FLOPs are counted by torch's FlopCounterMode on meta
tensors (matmuls and attention; elementwise work is not counted, as is usual for MFU):
Self-Flow's student forward+backward with two noise levels per sample, its projector, and the EMA
teacher's forward truncated after block k = round(0.7 depth).

Two samples are sized: the preset's training clip, and a realistic one in the preset's codec geometry
(`realistic_spec`): about 5 s of 480 x 848 video at about 16 fps with 44.1 kHz audio, and a 1024 px
image. Its exact length is the first whole number of audio tokens past 5 s, and its frame count the
nearest one the video codec and time patch accept (Wan-class causal VAEs: 1 + 4k frames).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.configs import Config
from selfflow.configs.factory import build_model
from selfflow.models.mmdit import MMDiT
from selfflow.tokenizers.spec import ClipSpec
from selfflow.training.objectives import alignment_layers

TASKS = {"image": ("image",), "video": ("video",), "audio": ("audio",), "av": ("video", "audio")}


def params_by_component(model: MMDiT) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    return dict(counts)


def realistic_spec(spec: ClipSpec, seconds: float = 5.0, fps: float = 16.0, rate: int = 44_100) -> ClipSpec:
    """The preset's codec geometry over ~`seconds` of 480 x 848 video at ~`fps` with `rate` Hz audio and
    1024 px images (ValueError when the preset's strides and patches do not tile that)."""
    unit = spec.audio_stride * spec.audio_patch  # samples per audio token
    duration = math.ceil(seconds * rate / unit) * unit / rate
    stride, patch = spec.time_stride, spec.video_patch[0]
    target = duration * fps  # frames
    latent = 1 + (target - 1) / stride if spec.causal_time else target / stride
    latent = patch * max(1, round(latent / patch))  # latent frames, whole time patches
    frames = 1 + stride * (latent - 1) if spec.causal_time else stride * latent
    sizes = dict(height=480, width=848, image_height=1024, image_width=1024, sample_rate=rate)
    return replace(spec, duration=duration, fps=frames / duration, **sizes)


def _forward_flops(
    model: MMDiT, cfg: Config, task: tuple[str, ...], backward: bool, stop: int | None, spec: ClipSpec
) -> int:
    lengths = {m: spec.tokens(m) for m in task}
    n = sum(lengths.values())
    width = model.params.txt_feature_dim
    with torch.device("meta"):
        media = {m: torch.randn(1, lengths[m], spec.token_dim(m)) for m in task}
        ids, levels, index = torch.zeros(n, 4), torch.rand(1, 2), torch.zeros(1, n, dtype=torch.long)
        shape = (1, cfg.text.max_len, width) if width else (1, cfg.text.max_len)
        txt = torch.zeros(shape) if width else torch.zeros(shape, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):  # meta tensors: shapes only, nothing allocated
        out = model(
            media,
            ids,
            levels,
            txt,
            t_index=index,
            txt_t=levels[:, 0],
            stop_after=stop,
            return_hidden=(stop,) if stop else (),
        )
        if backward:
            sum(v.float().sum() for v in out.velocity.values()).backward()
    return counter.get_total_flops()


def training_flops(
    model: MMDiT, cfg: Config, task: tuple[str, ...], spec: ClipSpec | None = None
) -> dict[str, int]:
    """FLOPs of one Self-Flow training sample (batch 1) for a task (of `spec`, default the preset's)."""
    spec = spec or cfg.spec
    _, k = alignment_layers(model.params.depth)
    d, n = model.params.hidden_size, sum(spec.tokens(m) for m in task)
    student_fwd = _forward_flops(model, cfg, task, backward=False, stop=None, spec=spec)
    student = _forward_flops(model, cfg, task, backward=True, stop=None, spec=spec)
    projector = 3 * 2 * (d * 2 * d + 2 * d * d) * n  # Linear D->2D->D on media tokens, fwd + bwd
    teacher = _forward_flops(model, cfg, task, backward=False, stop=k, spec=spec)
    return {
        "student_fwd": student_fwd,
        "student_fwd_bwd": student + projector,
        "teacher_fwd": teacher,
        "total": student + projector + teacher,
    }


def report(cfg: Config) -> str:
    model = build_model(cfg, "meta").eval()  # model FLOPs: activation-checkpoint recompute not counted
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"params: {total}",
        f"preset: {cfg.name} ({total / 1e6:.1f}M parameters)",
        "",
        "params per component:",
    ]
    lines += [f"  {name:<16}{count:>14,}" for name, count in params_by_component(model).items()]
    try:
        real = realistic_spec(cfg.spec)
    except ValueError as err:
        real, why = None, str(err)
    samples = [("the preset's training clip", cfg.spec)]
    if real is not None:
        clip = f"{real.duration:.2f} s of {real.height}x{real.width} video at {real.fps:.2f} fps"
        audio = f"{real.sample_rate / 1000:g} kHz audio"
        samples.append((f"a realistic sample: {clip} with {audio}; a {real.image_height} px image", real))
    for title, spec in samples:
        lines += ["", f"{title}:"] + _sample_lines(model, cfg, spec)
    if real is None:
        lines += ["", f"a realistic sample (5 s of 480p video, 44.1 kHz audio, 1024 px image): n/a ({why})"]
    return "\n".join(lines)


def _sample_lines(model: MMDiT, cfg: Config, spec: ClipSpec) -> list[str]:
    """Tokens per modality and training FLOPs per task of one sample of `spec`."""
    lines = ["  tokens per modality:"]
    for m in ("image", "video", "audio"):
        lines.append(f"    {m:<6}{spec.tokens(m):>7} tokens x {spec.token_dim(m)} channels")
    lines.append(f"    text  {cfg.text.max_len:>7} tokens ({cfg.text.tokenizer} tokenizer)")
    depth = model.params.depth
    s, k = alignment_layers(depth)
    lines.append(f"  training FLOPs per sample (Self-Flow: student block {s}, teacher block {k} of {depth})")
    head = ("student fwd", "student f+b", "teacher fwd", "total")
    lines.append(f"    {'task':<6}{'tokens':>8}" + "".join(f"{h:>14}" for h in head))
    for task, modalities in TASKS.items():
        f = training_flops(model, cfg, modalities, spec)
        n = sum(spec.tokens(m) for m in modalities) + cfg.text.max_len
        keys = ("student_fwd", "student_fwd_bwd", "teacher_fwd", "total")
        lines.append(f"    {task:<6}{n:>8}" + "".join(f"{f[key]:>14.3e}" for key in keys))
    return lines
