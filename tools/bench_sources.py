#!/usr/bin/env python
"""Reader throughput by source: the same images as ordinary img2dataset-style shards named by a brace
pattern, read through a `pipe:cat` command, and re-sharded by make_shards, side by side in one run.

    python tools/bench_sources.py --images 2000 --preset small --rounds 3

The images are JPEGs of 200..400 px per side with a caption and img2dataset's json, 250 per shard.
Each round reads every sample once from each source (one process, no workers), in a rotating order;
the report is the median samples/s per source and the ratio to the make_shards folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from selfflow.configs import load_config
from selfflow.data.pipeline import DataPipeline
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tools import make_shards


def write_img2dataset(folder: Path, images: int, per_shard: int = 250) -> str:
    """JPEG + txt + json samples in `{00000..}.tar`; returns the brace pattern naming them."""
    import webdataset as wds

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = -(-images // per_shard)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                h, w = (int(x) for x in rng.integers(200, 400, 2))
                pixels = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
                img = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                meta = {"caption": f"picture {i}", "width": w, "height": h, "key": f"{i:09d}"}
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"picture {i}",
                            "json": json.dumps(meta)})  # fmt: skip
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def read_rate(source: str, spec: ClipSpec, images: int, batch: int) -> float:
    """Samples per second reading every sample of `source` once (the first batch untimed)."""
    pipe = DataPipeline(source, spec, seed=0, weights={"image": 1.0}, batch_size=batch, shuffle_buffer=64)
    next(pipe)
    batches = max(images // batch - 2, 1)
    start = time.perf_counter()
    for _ in range(batches):
        next(pipe)
    return batches * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    spec = load_config(args.preset).spec
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_img2dataset(Path(tmp) / "plain", args.images)
        out = Path(tmp) / "made"
        with contextlib.redirect_stdout(sys.stderr):  # make_shards' summary line; stdout is the report
            make_shards.main(["--input", pattern, "--output", str(out), "--quiet", "--shard-samples", "250"])
        sources = {"brace_pattern": pattern, "pipe_cat": f"pipe:cat {pattern}", "make_shards": str(out)}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        for r in range(args.rounds):
            names = list(sources)[r % 3 :] + list(sources)[: r % 3]
            for name in names:
                rates[name].append(read_rate(sources[name], spec, args.images, args.batch))
    median = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "preset": args.preset,
        "images": args.images,
        "image_size": f"{spec.image_height}x{spec.image_width}",
        "samples_per_s": {k: round(v, 1) for k, v in median.items()},
        "ratio_to_make_shards": {k: round(v / median["make_shards"], 3) for k, v in median.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
