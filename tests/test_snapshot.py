"""Snapshots (EMA safetensors + config JSON + sha256): export, faithful loading, refusal of damaged
weights; and the default model that ships in assets/default/, used by every CLI without --ckpt."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from selfflow.configs.schema import load_config
from selfflow.data.shards import sha256_file
from selfflow.inference import sample_av, sample_image
from selfflow.inference.pipeline import load_snapshot
from selfflow.inference.snapshot import (
    CARD,
    CONFIG,
    DEFAULT_SNAPSHOT,
    INFO,
    WEIGHTS,
    export_snapshot,
    read_snapshot,
)
from selfflow.tools import export_snapshot as export_cli
from selfflow.training.checkpoint import load_weights

REPO = Path(__file__).resolve().parents[1]


def test_export_holds_the_ema_weights_config_and_digest(av_ckpt, tmp_path):
    out = export_snapshot(av_ckpt, tmp_path / "snap", dtype="float32")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([CARD, CONFIG, INFO, WEIGHTS, "transformer/config.json",
                            "scheduler/scheduler_config.json"])  # fmt: skip
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in out.rglob("*") if p.is_file())
    info = json.loads((out / INFO).read_text())
    assert info["files"][WEIGHTS] == sha256_file(out / WEIGHTS)
    assert set(info["files"]) == set(files) - {CARD, INFO}
    assert info["format"] == 2 and info["step"] == 2 and info["dtype"] == "float32"
    cfg, state, _ = read_snapshot(out)
    ema = load_weights(av_ckpt, "ema")
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    ckpt_cfg, _ = load_snapshot(av_ckpt)
    assert cfg == ckpt_cfg
    half = read_snapshot(export_snapshot(av_ckpt, tmp_path / "half"))[1]  # float16 by default
    assert all(half[k].dtype == torch.float32 for k in half)
    assert all(torch.allclose(half[k], ema[k], rtol=1e-3, atol=1e-4) for k in ema)
    assert (tmp_path / "half" / WEIGHTS).stat().st_size < 0.6 * (out / WEIGHTS).stat().st_size


def test_a_snapshot_samples_exactly_like_its_checkpoint(av_ckpt, tmp_path):
    snap = export_snapshot(av_ckpt, tmp_path / "snap", dtype="float32")
    wavs = []
    for source, name in ((av_ckpt, "ckpt"), (snap, "snap")):
        out = tmp_path / f"{name}.mp4"
        args = ["--ckpt", str(source), "--prompt", "x", "--steps", "2", "--quiet", "--out", str(out)]
        assert sample_av.main(args) == 0
        wavs.append(out.with_suffix(".wav").read_bytes())
    assert wavs[0] == wavs[1]
    meta = json.loads((tmp_path / "snap.json").read_text())
    assert meta["model_sha256"] == json.loads((snap / INFO).read_text())["files"][WEIGHTS]


def test_damaged_or_missing_snapshot_files_are_refused(av_ckpt, tmp_path, capsys):
    snap = export_snapshot(av_ckpt, tmp_path / "snap")
    data = bytearray((snap / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in a weight: still a readable safetensors file
    (snap / WEIGHTS).write_bytes(bytes(data))
    out = tmp_path / "x.mp4"
    assert sample_av.main(["--ckpt", str(snap), "--prompt", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and err.count("\n") == 1 and not list(tmp_path.glob("x.*"))
    (snap / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG):
        read_snapshot(snap)
    assert export_cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "s2")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err and not (tmp_path / "s2").exists()


def test_export_replaces_a_previous_snapshot_whole(av_ckpt, tmp_path, capsys):
    out = tmp_path / "snap"
    assert export_cli.main([str(av_ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    assert "step 2, float32" in capsys.readouterr().out
    assert export_cli.main([str(av_ckpt), "--out", str(out)]) == 0
    assert json.loads((out / INFO).read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no temporary or old copies left
    # anything else at --out is left alone: a file, a folder of other things (empty folders are fine)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.py").write_text("mine")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for name in ("notes.txt", "work"):
        assert export_cli.main([str(av_ckpt), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a model folder (no snapshot.json)" in err
    assert (tmp_path / "notes.txt").read_text() == (tmp_path / "work" / "keep.py").read_text() == "mine"
    assert export_cli.main([str(av_ckpt), "--out", str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt", "snap", "work"]


def test_the_default_model_is_small_and_intact():
    size = sum(p.stat().st_size for p in DEFAULT_SNAPSHOT.rglob("*") if p.is_file())
    assert size <= 25 * 2**20  # codecs included
    cfg, model = load_snapshot(None)  # sha256-checked, the codecs' files too
    assert cfg.name == "default" and not model.training
    preset = load_config(REPO / "configs" / "default.yaml")  # the shipped weights are the preset's model
    assert (cfg.model, cfg.spec, cfg.text) == (preset.model, preset.spec, preset.text)
    for m in ("image", "video", "audio"):  # the preset's codec folders are built by make default-model;
        # the snapshot carries its copies
        assert getattr(preset.codecs, m) != "identity"
        assert Path(getattr(cfg.codecs, m)).resolve().is_relative_to(DEFAULT_SNAPSHOT.resolve())
    assert cfg.codecs.video == cfg.codecs.image  # one picture codec, stored once


def test_out_of_the_box_av_clip_has_picture_and_sound(tmp_path):
    """The README's first command, as a user runs it: no --ckpt, default options."""
    out = tmp_path / "ball.mp4"
    cmd = [
        sys.executable,
        "inference/sample_av.py",
        "--prompt",
        "a ball bounces three times",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg, _ = load_snapshot(None)
    with av.open(str(out)) as box:
        v, a = box.streams.video[0], box.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        frames = list(box.decode(video=0))
    assert len(frames) == cfg.spec.num_frames
    assert json.loads(out.with_suffix(".json").read_text())["checkpoint"] == str(DEFAULT_SNAPSHOT)


def test_default_model_draws_images_and_silent_video(tmp_path):
    grid = tmp_path / "grid.png"
    assert sample_image.main(["--prompt", 'a sign that says "cat"', "--num", "2", "--steps", "4",
                              "--quiet", "--out", str(grid)]) == 0  # fmt: skip
    from PIL import Image

    h, w = Image.open(grid).size[::-1]
    cfg, _ = load_snapshot(None)
    assert (h, w) == (cfg.spec.image_height + 4, 2 * cfg.spec.image_width + 6)  # 1 row x 2, 2 px padding
    clip = tmp_path / "clip.mp4"
    args = ["--prompt", "the digit 3 moves to the right", "--steps", "4", "--quiet", "--out", str(clip)]
    assert sample_av.main(args, modalities=("video",)) == 0
    with av.open(str(clip)) as box:
        assert len(box.streams.video) == 1 and not box.streams.audio


def test_offloaded_weights_sample_the_same_clip(av_ckpt, tmp_path, capsys):
    """accelerate big-model loading: a memory budget that holds only the input layers puts every block
    in an offload folder on disk, and the clip is the same as with the whole model in memory."""
    snap = export_snapshot(av_ckpt, tmp_path / "snap", dtype="float32")
    _, model = load_snapshot(snap, max_memory={"cpu": "9MB"}, offload_dir=tmp_path / "off")
    assert {"disk", "cpu"} <= set(model.hf_device_map.values())
    assert model.hf_device_map["double_blocks"] == "disk" and any((tmp_path / "off").iterdir())
    outs = []
    for name, extra in (
        ("plain", []),
        ("offload", ["--max-memory", "cpu=9MB", "--offload-dir", str(tmp_path / "o")]),
    ):
        out = tmp_path / f"{name}.mp4"
        assert (
            sample_av.main(
                ["--ckpt", str(snap), "--prompt", "x", "--steps", "2", "--quiet", "--out", str(out), *extra]
            )
            == 0
        )
        outs.append(out.with_suffix(".wav").read_bytes())
    assert outs[0] == outs[1]
    for bad in ("cpu=9MB", "0=20GiB,gpu=3GB", "cpu=lots"):
        budget = ["--max-memory", bad]
        assert (
            sample_av.main(["--ckpt", str(snap), "--prompt", "x", "--out", str(tmp_path / "b.mp4"), *budget])
            == 2
        )
    err = capsys.readouterr().err
    assert "offload folder" in err and "DEVICE=SIZE" in err and not (tmp_path / "b.mp4").exists()
    with pytest.raises(ValueError, match="not even"):
        load_snapshot(snap, max_memory={"cpu": "1KB"}, offload_dir=tmp_path / "off2")


def test_evaluate_scores_samples_next_to_real_items(av_ckpt, fmnist_shards, tmp_path, capsys):
    from selfflow.tools import evaluate

    out = tmp_path / "eval.json"
    args = ["--ckpt", str(av_ckpt), "--tasks", "class,video", "--n", "3", "--steps", "2", "--out", str(out)]
    more = ["--probe", "20", "--val-shards", str(fmnist_shards), "--val-batches", "1", "--codec"]
    assert evaluate.main([*args, *more]) == 0
    report = json.loads(out.read_text())  # strict JSON: metrics without events are null, not NaN
    tasks = report["tasks"]
    assert report["preset"] == "tiny" and set(tasks) == {"class", "video"}
    assert tasks["class"]["samples"]["fid"] > 0 and tasks["class"]["real"]["n"] == 3
    assert tasks["video"]["real"]["temporal"]["ratio"] < 0.6  # real clips are far smoother than shuffled
    assert set(report["probe"]["levels"]) == {"0.0", "0.25", "0.5"}
    accs = [v for blocks in report["probe"]["levels"].values() for b in blocks.values() for v in b.values()]
    assert len(accs) == 3 * 4 * 2 and all(0 <= a <= 1 for a in accs)  # 3 levels x 4 blocks x 2 probes
    assert report["validation"]["tasks"]["image"]["loss"] > 0
    # a pixel-space model's codec is the identity: its round trip scores exactly as the real items
    assert tasks["video"]["codec"] == tasks["video"]["real"]
    assert tasks["class"]["codec"]["fid"] == pytest.approx(tasks["class"]["real"]["fid"])
    assert evaluate.main(["--tasks", "class,nope", "--out", str(tmp_path / "bad.json")]) == 2
    assert "--tasks" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_a_latent_model_snapshot_carries_its_codecs_and_samples_from_anywhere(shards, tmp_path):
    """A run on a diffusers autoencoder: the snapshot holds the codec (config + weights, sha256-checked),
    names it relative to itself, and samples the same image after the snapshot moved."""
    import shutil

    import diffusers

    from selfflow.training.loop import train

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).save_pretrained(tmp_path / "ae")  # fmt: skip
    over = [f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", f"codecs.image={tmp_path / 'ae'}",
            "spec.image_latent_channels=4", "spec.space_stride=2", "spec.image_patch=2",
            "spec.video_patch=[1,4,4]", "train.batch_size=2", "train.max_steps=1", "sample.num=1",
            "sample.steps=1"]  # fmt: skip
    train(load_config("tiny", over), progress=False)
    snap = export_snapshot(tmp_path / "run", tmp_path / "snap")  # float16, the codec's weights too
    info = json.loads((snap / INFO).read_text())
    from safetensors.torch import load_file

    stored = load_file(snap / "codecs" / "image" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert {"codecs/image/config.json", "codecs/image/diffusion_pytorch_model.safetensors"} <= set(
        info["files"]
    )
    assert load_config(snap / CONFIG).codecs.image == "codecs/image"
    shutil.move(snap, tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "ae")  # the original codec folder is gone: the snapshot's copy serves
    images = []
    for i in range(2):
        out = tmp_path / f"img{i}.png"
        assert sample_image.main(["--ckpt", str(tmp_path / "elsewhere"), "--prompt", "pattern", "--num", "1",
                                  "--steps", "2", "--quiet", "--out", str(out)]) == 0  # fmt: skip
        images.append(out.read_bytes())
    assert images[0] == images[1]
    weights = tmp_path / "elsewhere" / "codecs" / "image" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="codecs/image/diffusion_pytorch_model.safetensors"):
        read_snapshot(tmp_path / "elsewhere")


def test_the_codec_side_is_the_real_items_through_the_models_codecs():
    """The shipped model's trained codecs: reconstructions of real signs and AV clips keep their shape and
    are close to, but not the same as, the real media."""
    from selfflow.inference.pipeline import Generator, load_snapshot, resolve_model
    from selfflow.metrics import suite

    cfg, model = load_snapshot(resolve_model(None))
    gen = Generator(cfg, model)
    for task in ("text", "av"):
        real = suite.decode_items(suite.reference_items(task, 3, 1, cfg), task, cfg)
        back = suite.reconstruct(gen, real, batch=2)
        assert set(back) == set(real)
        for m, x in real.items():
            assert back[m].shape == x.shape
            err = float((back[m] - x).pow(2).mean())
            assert 0 < err < 0.1, (task, m, err)  # lossy, but a reconstruction (PSNR above 16 dB)
