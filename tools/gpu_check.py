#!/usr/bin/env python
"""One command for a GPU machine: what training costs per preset, in a few minutes.

    python tools/gpu_check.py --out gpu_check.json              # CUDA: small and base, 4b if it fits
    python tools/gpu_check.py --reduced --out gpu_check.json    # CPU: tiny, one timed step (make test)

For each preset and objective (`vanilla`, `self_flow`) on random image batches: seconds per step
(forward, backward, AdamW, EMA; bf16 autocast on CUDA), tokens/s (media + text tokens of the batch),
training FLOPs per step from `tools/model_info.py`'s counter (matmuls and attention), achieved TFLOP/s
and MFU against the device's dense bf16 peak (`--peak-tflops` for a device not in the table), peak
memory, and the attention kernels the profiler saw. The `self_flow` / `vanilla` step-time ratio is
given per preset, and `self_flow_packed`: the same images packed into one row (data.pack's layout,
attention kept per sample), with its tokens/s over the unpacked batch's. `4b` runs with activation
checkpointing, and only when its training state (20 bytes per parameter) fits the device.

The batches are random codec latents (the transformer's input; no codec runs). For a preset whose
codec or text encoder folders are not on the machine (`base`, `4b` name `models/...`), the check writes
config.json-only stand-ins of the classes they name (`stand_ins`) and uses the byte tokenizer for
captions: the transformer's cost is the same up to its text input layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selfflow.configs import load_config
from selfflow.configs.factory import build_model
from selfflow.tokenizers.spec import MODALITIES
from selfflow.tools.bench_step import sync
from selfflow.training.flops import training_flops
from selfflow.training.loop import build_trainer, make_batch
from selfflow.training.step import train_step

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the device name
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
}
KERNEL_WORDS = ("attention", "flash", "fmha", "cudnn", "sdpa", "efficient")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def attention_kernels(tr: Any, batch: Any) -> list[str]:
    """Names of the attention operators and kernels one profiled step ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if tr.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(tr, batch)
        sync(tr.device)
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in KERNEL_WORDS)}
    return sorted(names)


def flops_per_sample(cfg: Any, objective: str) -> int:
    """Training FLOPs of one image sample: the student's forward + backward, plus the projector and
    the truncated teacher forward for self_flow (counted on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg, "meta")
    counts = training_flops(model, cfg, ("image",))
    return counts["total"] if objective == "self_flow" else counts["student_fwd_bwd"]


def _kl16() -> Any:
    import diffusers

    down, up = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    return diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=down,
                                   up_block_types=up, latent_channels=16)  # fmt: skip


def stand_ins(preset: str, folder: Path) -> list[str]:
    """Overrides for the preset's codec / text encoder folders that are not here: config.json-only
    folders of a 16-channel 8x KL (images), diffusers' default Wan VAE (video) and Oobleck (audio), and
    the byte tokenizer for captions."""
    import diffusers

    cfg, out = load_config(preset), []
    makers = {"image": _kl16, "video": diffusers.AutoencoderKLWan, "audio": diffusers.AutoencoderOobleck}
    for m in MODALITIES:
        source = getattr(cfg.codecs, m)
        if source == "identity" or (Path(source) / "config.json").is_file():
            continue
        with torch.device("meta"):
            makers[m]().save_config(folder / m)
        out.append(f"codecs.{m}={folder / m}")
    if cfg.text.tokenizer == "encoder" and not (Path(cfg.text.path) / "config.json").is_file():
        out.append("text.tokenizer=byte")
    return out


def time_objective(
    preset: str, objective: str, args: argparse.Namespace, extra: list[str], packed: bool = False
) -> dict:
    """One row of the table; `packed`: the same images packed into one row (attention per sample)."""
    with tempfile.TemporaryDirectory() as tmp:
        over = [f"objective.name={objective}", f"train.device={args.device}", *stand_ins(preset, Path(tmp))]
        cfg = load_config(preset, [*over, *extra])
        tr = build_trainer(cfg)
    tasks = ("image",) * args.batch if packed else ()
    latents = torch.randn(args.batch, *cfg.spec.latent_shape("image"))  # [B, C, h, w]
    captions = ["a photo of a bag"] * args.batch
    batch = make_batch(tr, {"image": latents}, captions, tasks, frozenset({"image"}))
    train_step(tr, batch)  # warm-up: allocation, kernel selection
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    sync(tr.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(tr, batch)
    sync(tr.device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * (cfg.spec.tokens("image") + cfg.text.max_len)
    flops = args.batch * flops_per_sample(cfg, objective)
    peak, cuda = peak_tflops(tr.device, args.peak_tflops), tr.device.type == "cuda"
    achieved = flops / seconds / 1e12
    row = {
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "flops_per_step": flops,
        "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(tr.device) / 1e9 if cuda else None,
        "attention_kernels": attention_kernels(tr, batch),
    }
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def fits(preset: str, device: torch.device) -> str | None:
    """None when the preset's training state fits the device, else why not."""
    if device.type != "cuda":
        return None
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(load_config(preset), "meta").parameters())
    need, have = 20 * params / 1e9, torch.cuda.get_device_properties(device).total_memory / 1e9
    return None if need < 0.85 * have else f"training state {need:.0f} GB > 85 % of {have:.0f} GB"


def check(args: argparse.Namespace) -> dict:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    presets = ["tiny"] if args.reduced else args.presets.split(",")
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "peak_tflops": peak_tflops(device, args.peak_tflops),
        "presets": {},
    }
    for preset in presets:
        extra = ["model.grad_checkpointing=true"] if preset == "4b" else []
        reason = fits(preset, device)
        if reason:
            out["presets"][preset] = {"skipped": reason}
            continue
        rows = {name: time_objective(preset, name, args, extra) for name in ("vanilla", "self_flow")}
        rows["self_flow_packed"] = time_objective(preset, "self_flow", args, extra, packed=True)
        ratio = rows["self_flow"]["seconds_per_step"] / rows["vanilla"]["seconds_per_step"]
        packed = rows["self_flow_packed"]["tokens_per_s"] / rows["self_flow"]["tokens_per_s"]
        out["presets"][preset] = {**rows, "self_flow_over_vanilla": ratio, "packed_over_unpacked": packed}
        print(f"{preset}: done", file=sys.stderr)
    return out


def table(result: dict) -> str:
    lines = [f"device {result['device']}, torch {result['torch']}, batch {result['batch']}",
             "| preset | objective | s / step | tokens/s | TFLOP/s | MFU | peak GB | attention |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for preset, rows in result["presets"].items():
        if "skipped" in rows:
            lines.append(f"| {preset} | — | skipped: {rows['skipped']} | | | | | |")
            continue
        for name in ("vanilla", "self_flow", "self_flow_packed"):
            r = rows[name]
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
            mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "—"
            kernels = ", ".join(r["attention_kernels"][:3])
            lines.append(f"| {preset} | {name} | {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['tflops']:.2f} | {mfu} | {mem} | {kernels} |")  # fmt: skip
        lines.append(f"| {preset} | self_flow / vanilla | {rows['self_flow_over_vanilla']:.2f} | | | | | |")
        lines.append(
            f"| {preset} | packed / unpacked tokens/s | {rows['packed_over_unpacked']:.2f} | | | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,base,4b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    ap.add_argument("--reduced", action="store_true", help="tiny preset only: the CPU check make test runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.reduced:
        args.batch, args.steps = min(args.batch, 2), 1
    result = check(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
