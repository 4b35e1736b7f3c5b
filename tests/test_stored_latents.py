"""Training reads the codec latents make_shards stored (issue 18, item 2): a run configured with a
Wan-class video VAE, an Oobleck audio VAE and a KL image autoencoder trains from such shards without
encoding anything (its codec folders hold only config.json, so any encode would fail), gets the same
tokens as decoding and encoding the media, resumes exactly, and refuses latents of another codec."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import av_clip
from PIL import Image

from selfflow.configs.schema import load_config
from selfflow.data.latents import LatentMismatch, read_latent, stored_modalities
from selfflow.tokenizers.spec import ClipSpec
from tools import make_shards

REPO = Path(__file__).resolve().parents[1]
# 1 s at 9 fps: the causal VAE makes 1 + 8 / 4 = 3 latent frames of 4 x 4 (8x); images 64 x 64 -> 8 x 8
# (KL, 8x); audio 16000 samples -> 2000 latent frames (Oobleck, 8x)
PRESET = """name: stored-latents
model: {hidden_size: 64, num_heads: 2, depth_double: 1, depth_single: 2, axes_dim: [8, 8, 8, 8]}
spec: {duration: 1.0, fps: 9, height: 32, width: 32, sample_rate: 16000, image_height: 64, image_width: 64,
       image_latent_channels: 4, video_latent_channels: 4, audio_latent_channels: 4, space_stride: 8,
       time_stride: 4, causal_time: true, audio_stride: 8, image_patch: 2, video_patch: [1, 2, 2],
       audio_patch: 40}
text: {tokenizer: byte, max_len: 16}
train: {batch_size: 2, lr: 1.0e-3, log_every: 1, ckpt_every: 100}
data: {weights: {image: 1, av: 1}, shuffle_buffer: 0}
sample: {num: 1, steps: 1}
"""


def _autoencoders(root: Path, seed: int = 0) -> dict[str, Path]:
    import diffusers

    torch.manual_seed(seed)
    kl = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        scaling_factor=0.5,
    )  # fmt: skip
    wan = diffusers.AutoencoderKLWan(
        base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
        latents_std=[0.5, 1.5, 1.0, 2.0],
    )  # fmt: skip
    oobleck = diffusers.AutoencoderOobleck(
        encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2], decoder_channels=8,
        decoder_input_channels=4, audio_channels=1, sampling_rate=16000,
    )  # fmt: skip
    dirs = {"image": root / "kl", "video": root / "wan", "audio": root / "oobleck"}
    for ae, (_, folder) in zip((kl, wan, oobleck), dirs.items(), strict=True):
        ae.save_pretrained(folder)
    return dirs


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Media -> make_shards --latents (KL, Wan, Oobleck) -> shards; config-only copies of the codecs."""
    root = tmp_path_factory.mktemp("stored")
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(media / f"img_{i}.png")
        (media / f"img_{i}.txt").write_text(f"pattern {i}")
    for i in range(4):
        (media / f"clip_{i}.mp4").write_bytes(av_clip(i))
        (media / f"clip_{i}.txt").write_text(f"a square appears at frame {2 + i % 4}")
    dirs = _autoencoders(root / "codecs")
    (root / "preset.yaml").write_text(PRESET)
    shards = root / "shards"
    codecs = [arg for folder in dirs.values() for arg in ("--latents", str(folder))]
    argv = ["--input", str(media), "--output", str(shards), "--quiet", "--spec", str(root / "preset.yaml")]
    assert make_shards.main([*argv, "--shard-samples", "2", *codecs]) == 0
    bare = {}
    for m, folder in dirs.items():
        bare[m] = root / "config-only" / folder.name
        bare[m].mkdir(parents=True)
        shutil.copy(folder / "config.json", bare[m])
    return {"root": root, "shards": shards, "dirs": dirs, "bare": bare}


def _cfg(setup: dict, codecs: dict[str, Path], *extra: str):
    over = [f"codecs.{m}={p}" for m, p in codecs.items()]
    over += [f"data.shards={setup['shards']}"]
    return load_config(setup["root"] / "preset.yaml", [*over, *extra])


def test_the_manifest_stamps_each_modality_with_its_codec_and_shape(setup) -> None:
    av = json.loads((setup["shards"] / "manifest.json").read_text())["latents"]
    assert set(av) == {"image", "video", "audio"} and av["image"]["shape"] == [4, 8, 8]
    assert av["video"]["class"] == "AutoencoderKLWan" and av["video"]["shape"] == [4, 3, 4, 4]
    assert av["audio"]["class"] == "AutoencoderOobleck" and av["audio"]["shape"] == [4, 2000]
    assert av["video"]["weights"] and av["video"]["config"]


def test_stored_latents_give_the_tokens_of_decoding_and_encoding(setup) -> None:
    """Same shards, same batches: tokens from stored latents equal the codecs' encoding of the media."""
    from selfflow.training.loop import build_data, build_trainer, make_batch

    for task in ("image", "av"):
        extra = (f"data.weights={{{task}: 1}}",)
        on, off = _cfg(setup, setup["dirs"], *extra), _cfg(setup, setup["dirs"], *extra, "data.latents=never")
        tr = build_trainer(on, torch.device("cpu"))
        read, decoded = next(build_data(on)), next(build_data(off))
        assert read.keys == decoded.keys and read.latents and not decoded.latents
        got = make_batch(tr, read.media, read.captions, latents=read.latents)
        want = make_batch(tr, decoded.media, decoded.captions)
        for m in want.media:
            torch.testing.assert_close(got.media[m], want.media[m], rtol=0, atol=2e-5)


def test_a_run_with_config_only_codecs_trains_from_stored_latents(setup, tmp_path: Path) -> None:
    """The codec folders hold only config.json: any encode would raise, yet training runs; the run logs
    which modalities it read and that the sample grid (which must decode) was skipped."""
    from selfflow.training.loop import train

    cfg = _cfg(setup, setup["bare"], f"run.dir={tmp_path / 'run'}", "train.max_steps=4")
    assert train(cfg, progress=False)["step"] == 4
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stored = [e["modalities"] for e in events if e.get("event") == "stored_latents"]
    assert stored == [["audio", "image", "video"]]
    assert any(e.get("event") == "sample_grid_skipped" for e in events)
    losses = [e["loss"] for e in events if "loss" in e]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_resuming_on_stored_latents_continues_exactly(setup) -> None:
    from selfflow.data.pipeline import DataPipeline

    cfg = _cfg(setup, setup["bare"])
    kwargs = dict(shards=cfg.data.shards, spec=cfg.spec, seed=3, weights={"av": 1.0}, batch_size=2)
    kwargs |= dict(latents=frozenset({"video", "audio"}), shuffle_buffer=4)
    first = DataPipeline(**kwargs)
    next(first)
    state = first.state_dict()
    again = DataPipeline(**kwargs)
    again.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(3):
        a, b = next(first), next(again)
        assert a.keys == b.keys and all(torch.equal(a.media[m], b.media[m]) for m in a.media)


def test_latents_of_another_codec_fail_at_start_in_one_line(setup, tmp_path: Path) -> None:
    other = _autoencoders(tmp_path / "other", seed=1)  # same configs, other weights
    cfg = _cfg(setup, setup["dirs"], "data.weights={av: 1}")
    tasks, codecs = ["av"], {"video": str(other["video"]), "audio": str(setup["dirs"]["audio"])}
    with pytest.raises(LatentMismatch, match="video latents of another codec"):
        stored_modalities(cfg.data.shards, {}, tasks, codecs, cfg.spec)
    # a config-only folder of another config is refused too (no weights to compare)
    config = json.loads((setup["bare"]["audio"] / "config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**config, "decoder_channels": 16}))
    with pytest.raises(LatentMismatch, match="audio latents of another codec"):
        stored_modalities(cfg.data.shards, {}, tasks, {"audio": str(tmp_path / "cfg")}, cfg.spec)
    # a clip spec whose latents have another shape
    longer = ClipSpec(**{**cfg.spec.__dict__, "duration": 2.0, "fps": 4.5})
    with pytest.raises(LatentMismatch, match=r"shape \(4, 2000\), the run's spec needs \(4, 4000\)"):
        stored_modalities(cfg.data.shards, {}, tasks, {"audio": str(setup["dirs"]["audio"])}, longer)
    # and the trainer's command line: exit 2, one line, nothing trained
    args = [f"codecs.{m}={p}" for m, p in codecs.items()] + [f"run.dir={tmp_path / 'run'}"]
    args += [f"data.shards={cfg.data.shards}", "data.weights={av: 1}"]
    done = subprocess.run(
        [sys.executable, "training/main.py", "--config", str(setup["root"] / "preset.yaml"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "another codec" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sources_without_stored_latents_or_identity_codecs_encode(setup, tmp_path: Path) -> None:
    cfg = _cfg(setup, setup["dirs"])
    codecs = {m: str(p) for m, p in setup["dirs"].items() if m != "image"}
    assert stored_modalities(cfg.data.shards, {}, ["av"], codecs, cfg.spec) == {"video", "audio"}
    assert stored_modalities(cfg.data.shards, {}, ["av"], {"video": "identity"}, cfg.spec) == set()
    plain = tmp_path / "plain"
    shutil.copytree(setup["shards"], plain)
    (plain / "manifest.json").unlink()  # shards of unknown origin: their latents cannot be checked
    both = f"{cfg.data.shards},{plain}"
    assert stored_modalities(both, {}, ["av"], codecs, cfg.spec) == set()


def test_stored_latents_are_bounded_before_they_are_read() -> None:
    spec = ClipSpec(
        duration=1.0, fps=8, sample_rate=16000, audio_latent_channels=4, audio_stride=8, audio_patch=40
    )

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        return buf.getvalue()

    good = np.ones((4, 2000), np.float32)
    np.testing.assert_array_equal(read_latent({"audio_latent.npy": npy(good)}, "audio", spec), good)
    half = read_latent({"audio_latent.npy": npy(good.astype(np.float16))}, "audio", spec)
    assert half.dtype == np.float32
    huge = npy(np.ones((4, 1), np.float32)).replace(b"(4, 1)", b"(4, 2000000000000)".ljust(6))
    cases = {
        "holds": npy(np.ones((4, 1999), np.float32)),  # another shape
        "float64": npy(good.astype(np.float64)),
        "object": npy(np.array([{"a": 1}], dtype=object)),  # a pickle is never loaded
        "bytes of data": npy(good)[:-8],  # truncated
        "not an .npy": b"RIFF....",
        "(4, 2000000000000)": huge,  # a header that claims 32 TB: refused before any allocation
    }
    for words, data in cases.items():
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            read_latent({"audio_latent.npy": data}, "audio", spec)
    with pytest.raises(ValueError, match="no audio_latent.npy field"):
        read_latent({}, "audio", spec)


def test_packed_batches_read_stored_latents_too(setup) -> None:
    """data.pack: samples of any task in one row, their media read from the stored latents."""
    from selfflow.training.loop import build_data, build_trainer, make_batch

    cfg = _cfg(setup, setup["bare"], "data.pack=true", "data.tokens_per_batch=200")
    tr = build_trainer(cfg, torch.device("cpu"))
    item = next(build_data(cfg))
    assert item.task == "packed" and item.latents == {"image", "video", "audio"}
    batch = make_batch(tr, item.media, item.captions, item.tasks, item.latents)  # no codec weights: no encode
    assert batch.samples == len(item.tasks) and batch.tokens <= 200
