#!/usr/bin/env python
"""Attention with and without the padding mask, side by side in one run: forward + backward of one
attention call over a [text; media] batch whose captions have random lengths.

    python tools/bench_attention.py --preset small --batch 8 --rounds 5

- `masked`: SDPA with the boolean padding mask (the design before models/attention.py's ragged path);
- `ragged`: `models.attention.attention` over the kept tokens (what the model runs now);
- `dense`: SDPA over the same batch with no padding at all (every caption of full length), the lower
  bound.

Shapes come from the preset (heads, head dim, media tokens of an image, `text.max_len`); caption
lengths are uniform in [8, max_len / 2]. Median over interleaved rounds, ratio to `masked`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from selfflow.configs import load_config
from selfflow.models.attention import attention, ragged_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per round")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset)
    heads, lt, lm = cfg.model.num_heads, cfg.text.max_len, cfg.spec.tokens("image")
    dh = cfg.model.hidden_size // heads
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, max(9, lt // 2), (args.batch,), generator=gen)
    keep = torch.cat(
        [torch.arange(lt)[None] < lengths[:, None], torch.ones(args.batch, lm, dtype=torch.bool)], 1
    )
    q, k, v = (
        torch.randn(args.batch, heads, lt + lm, dh, generator=gen, requires_grad=True) for _ in range(3)
    )
    ragged = ragged_rows(keep)
    runs = {
        "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]),
        "ragged": lambda: attention(q, k, v, ragged),
        "dense": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                run().sum().backward()
            times[name].append((time.perf_counter() - start) / args.calls)
    base = statistics.median(times["masked"][1:])
    print(f"preset {args.preset}: batch {args.batch}, {heads} heads x {dh}, {lt} text + {lm} media tokens, "
          f"captions {int(lengths.min())}..{int(lengths.max())} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| attention | ms / call (fwd + bwd) | ratio to masked |\n|---|---|---|")
    for name in runs:
        med = statistics.median(times[name][1:])
        print(f"| {name} | {1000 * med:.1f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
