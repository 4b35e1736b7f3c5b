#!/usr/bin/env python
"""Mixed-task training packed vs one task per batch, side by side in one run (CPU or GPU).

    python tools/bench_packing.py --preset tiny --tokens 1200 --steps 12 --rounds 2

The same shards (image, video, audio and AV samples at the preset's clip spec, weights equal) feed two
trainers of the same model: `packed` (data.pack, `--tokens` media + caption tokens per batch, samples
of every task in one row) and `one-task` (the usual batches: one task per step, the batch size that
gives the same mean number of tokens per step). Rounds alternate the two; per step: tokens the model
processed (media + caption slots), the caption padding among them, and the wall time. Reported: tokens
per second, the padding fraction, and the spread of step times (p90 / p10), medians over rounds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from selfflow.configs import load_config
from selfflow.data.avio import encode_mp4
from selfflow.data.fields import TASK_MODALITIES
from selfflow.data.shards import ShardWriter
from selfflow.tools.bench_step import sync
from selfflow.training.loop import build_data, build_trainer, data_stream
from selfflow.training.step import train_step

TASKS = ("image", "video", "audio", "av")


def write_shards(root: Path, spec, n: int = 24) -> None:
    """n random samples per task, 6 to a shard, at the spec's geometry."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frames, (h, w) = spec.num_frames, (spec.height, spec.width)
    for task in TASKS:
        (root / task).mkdir(parents=True)
        with ShardWriter(root / task, task, max_samples=6) as sink:
            for i in range(n):
                fields = {"__key__": f"{task}_{i:04d}", "txt": f"{task} sample number {i} " * (1 + i % 3)}
                sound = (0.3 * rng.standard_normal((1, spec.num_samples))).astype(np.float32)
                if task == "image":
                    buf = io.BytesIO()
                    pixels = rng.integers(0, 256, (spec.image_height, spec.image_width, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buf, format="PNG")
                    fields["png"] = buf.getvalue()
                elif task == "audio":
                    buf = io.BytesIO()
                    soundfile.write(buf, sound[0], spec.sample_rate, format="FLAC")
                    fields["flac"] = buf.getvalue()
                else:
                    video = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
                    fields["mp4"] = encode_mp4(
                        video, spec.fps, sound if task == "av" else None, spec.sample_rate
                    )
                sink.write(fields)


def run(cfg, steps: int) -> dict[str, list[float]]:
    """Per-step wall time, processed tokens and caption padding of `steps` steps (after 2 warm-up)."""
    tr = build_trainer(cfg, "cpu" if not torch.cuda.is_available() else None)
    out: dict[str, list[float]] = {"seconds": [], "tokens": [], "padding": []}
    stream = data_stream(tr, build_data(cfg))
    for i in range(steps + 2):
        batch, _ = next(stream)
        start = time.perf_counter()
        train_step(tr, batch)
        sync(tr.device)
        if i >= 2:
            out["seconds"].append(time.perf_counter() - start)
            out["tokens"].append(batch.tokens)
            out["padding"].append(int((~batch.txt_mask).sum()) if batch.txt_mask is not None else 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=1200, help="packed: media + caption tokens per batch")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    spec, text = load_config(args.preset).spec, load_config(args.preset).text.max_len
    per_sample = {t: sum(spec.tokens(m) for m in TASK_MODALITIES[t]) + text for t in TASKS}
    batch = max(1, round(args.tokens / statistics.mean(per_sample.values())))
    results: dict[str, dict[str, list[float]]] = {"packed": {}, "one-task": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), spec)
        shards = ",".join(str(Path(tmp) / t) for t in TASKS)
        common = [f"data.shards={shards}", "data.weights={image: 1, video: 1, audio: 1, av: 1}",
                  f"run.dir={tmp}/run", "data.shuffle_buffer=8"]  # fmt: skip
        configs = {
            "packed": load_config(
                args.preset, [*common, "data.pack=true", f"data.tokens_per_batch={args.tokens}"]
            ),
            "one-task": load_config(args.preset, [*common, f"train.batch_size={batch}"]),
        }
        for r in range(args.rounds):
            for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:
                for key, values in run(configs[name], args.steps).items():
                    results[name].setdefault(key, []).extend(values)
    print(
        f"preset {args.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"packed budget {args.tokens} tokens, one-task batch {batch}, tokens per sample {per_sample}"
    )
    print("| batches | tokens / s | caption padding | step time p90 / p10 | mean s / step |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rate, pad = sum(r["tokens"]) / sum(r["seconds"]), sum(r["padding"]) / sum(r["tokens"])
        q, mean = statistics.quantiles(r["seconds"], n=10), statistics.mean(r["seconds"])
        print(f"| {name} | {rate:.0f} | {100 * pad:.1f} % | {q[-1] / q[0]:.2f} | {mean:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
