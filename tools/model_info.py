#!/usr/bin/env python
"""Size a preset without allocating it: parameters, tokens per modality, training FLOPs per sample.

    python tools/model_info.py configs/4b.yaml [key=value ...]

The model is built on the meta device. FLOPs are counted by torch's FlopCounterMode on meta
tensors (matmuls and attention; elementwise work is not counted, as is usual for MFU):
Self-Flow's student forward+backward with two noise levels per sample, its projector, and the EMA
teacher's forward truncated after block k = round(0.7 depth).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.configs import Config, ConfigError, load_config
from selfflow.models.factory import build_model
from selfflow.models.mmdit import MMDiT
from selfflow.training.objectives import alignment_layers

TASKS = {"image": ("image",), "video": ("video",), "audio": ("audio",), "av": ("video", "audio")}


def params_by_component(model: MMDiT) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    return dict(counts)


def _forward_flops(model: MMDiT, cfg: Config, task: tuple[str, ...], backward: bool, stop: int | None) -> int:
    lengths = {m: cfg.spec.tokens(m) for m in task}
    n = sum(lengths.values())
    with torch.device("meta"):
        media = {m: torch.randn(1, lengths[m], cfg.spec.token_dim(m)) for m in task}
        ids, levels, index = torch.zeros(n, 4), torch.rand(1, 2), torch.zeros(1, n, dtype=torch.long)
        txt = torch.zeros(1, cfg.text.max_len, dtype=torch.long)
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


def training_flops(model: MMDiT, cfg: Config, task: tuple[str, ...]) -> dict[str, int]:
    """FLOPs of one Self-Flow training sample (batch 1) for a task."""
    _, k = alignment_layers(model.params.depth)
    d, n = model.params.hidden_size, sum(cfg.spec.tokens(m) for m in task)
    student_fwd = _forward_flops(model, cfg, task, backward=False, stop=None)
    student = _forward_flops(model, cfg, task, backward=True, stop=None)
    projector = 3 * 2 * (d * 2 * d + 2 * d * d) * n  # Linear D->2D->D on media tokens, fwd + bwd
    teacher = _forward_flops(model, cfg, task, backward=False, stop=k)
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
    lines += ["", "tokens per modality:"]
    for m in ("image", "video", "audio"):
        lines.append(f"  {m:<6}{cfg.spec.tokens(m):>6} tokens x {cfg.spec.token_dim(m)} channels")
    lines.append(f"  text  {cfg.text.max_len:>6} tokens ({cfg.text.tokenizer} tokenizer)")
    depth = model.params.depth
    s, k = alignment_layers(depth)
    lines += [
        "",
        f"training FLOPs per sample (Self-Flow: student block {s}, teacher block {k} of {depth})",
    ]
    lines.append(
        f"  {'task':<6}{'tokens':>7}{'student fwd':>14}{'student f+b':>14}{'teacher fwd':>14}{'total':>14}"
    )
    for task, modalities in TASKS.items():
        f = training_flops(model, cfg, modalities)
        n = sum(cfg.spec.tokens(m) for m in modalities) + cfg.text.max_len
        lines.append(
            f"  {task:<6}{n:>7}"
            + "".join(
                f"{f[key]:>14.3e}" for key in ("student_fwd", "student_fwd_bwd", "teacher_fwd", "total")
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="preset name or YAML path, e.g. configs/4b.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
