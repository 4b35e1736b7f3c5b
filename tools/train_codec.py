#!/usr/bin/env python
"""Train a small image, video or audio autoencoder on shards, as a diffusers folder the codecs load.

    python tools/train_codec.py --modality image --shards shards/ --out codecs/image --preset default \
        --width 32 --latent-channels 8 --down 2,2 --steps 2000
    python tools/train_codec.py --modality video --arch wan ...   # causal: 1 + (T - 1) / 4 latent frames
    python tools/train_codec.py --modality audio --down 4,4,8 --latent-channels 16 ...

Classes: AutoencoderKL (images; video frame by frame with --arch kl), AutoencoderKLWan (video, causal,
2 ** --time-down time stride), AutoencoderOobleck (audio, strides --down). The media are decoded from the
shards at the preset's clip geometry (sizes, fps, duration, sample rate). Loss: L1 + --kl x KL (+ --stft x
multi-resolution STFT for audio). A progress bar shows the losses; the run state is saved every
--ckpt-every steps in OUT/.train/ and rerunning the command continues from it. OUT gets the diffusers
folder (config.json with the latents' per-channel latents_mean / latents_std, safetensors weights) and
report.json: PSNR (images, video) or SI-SNR and the fraction of onsets kept within one video frame
(audio), on --eval-shards (default: the training shards, which the report then names).

Exit status: 0 done, 2 bad arguments or data (one line `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from selfflow.tokenizers.spec import MODALITIES  # light; the trainer (torch) is imported after parsing

if TYPE_CHECKING:
    from selfflow.training.codec_trainer import CodecRecipe


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, CodecRecipe]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", required=True, choices=MODALITIES)
    p.add_argument("--shards", required=True, help="shard sources, as data.shards takes them")
    p.add_argument("--out", required=True, help="the diffusers folder to write (and its run state)")
    p.add_argument("--preset", default="default", help="config preset whose spec gives the clip geometry")
    p.add_argument("--arch", help="kl | wan | oobleck (default: kl, wan, oobleck by modality)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--down", default="", help="comma-separated strides (default 2,2,2; audio 4,4,8)")
    p.add_argument("--time-down", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl", type=float, default=1e-4)
    p.add_argument("--stft", type=float, default=1.0)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-shards", default=None)
    p.add_argument("--eval-n", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from selfflow.training.codec_trainer import ARCHS, CodecRecipe

    arch = args.arch or ARCHS[args.modality][0]
    down = args.down or ("4,4,8" if arch == "oobleck" else "2,2,2")
    recipe = CodecRecipe(
        args.modality, arch, width=args.width, latent_channels=args.latent_channels,
        down=tuple(int(d) for d in down.split(",")), time_down=args.time_down, steps=args.steps,
        batch=args.batch, lr=args.lr, kl_weight=args.kl, stft_weight=args.stft,
        ckpt_every=args.ckpt_every, seed=args.seed,
    )  # fmt: skip
    return args, recipe


def main(argv: list[str] | None = None) -> int:
    from selfflow.configs import ConfigError, load_config

    try:
        args, recipe = parse(argv)
        from selfflow.training.codec_trainer import train_codec

        spec = load_config(args.preset).spec
        report = train_codec(
            recipe, args.shards, args.out, spec, args.eval_shards, args.eval_n, not args.quiet
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
