"""inference/sample_av.py: a playable mp4 with both streams from a trained checkpoint, deterministic
per seed, and one-line errors with nothing written on bad input."""

from __future__ import annotations

import io
import json
import shutil

import av
import pytest
import soundfile
import torch

from selfflow.inference import sample_av
from selfflow.training.checkpoint import write_manifest


def _run(*args: str) -> int:
    return sample_av.main(list(args))


def test_writes_a_synchronized_mp4_wav_sheet_and_sidecar(av_ckpt, tmp_path):
    out = tmp_path / "clip.mp4"
    assert (
        _run("--ckpt", str(av_ckpt), "--prompt", "a square appears", "--steps", "2", "--out", str(out)) == 0
    )
    with av.open(str(out)) as box:
        v, a = box.streams.video[0], box.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert float(v.average_rate) == 8 and a.codec_context.sample_rate == 16_000
        assert float(v.duration * v.time_base) == pytest.approx(1.0, abs=0.13)
        meta = json.loads(box.metadata["comment"])
        frames = sum(1 for _ in box.decode(video=0))
    assert (
        frames == 8
        and meta["prompt"] == "a square appears"
        and meta["seed"] == 0
        and len(meta["model_sha256"]) == 64
    )
    wave, rate = soundfile.read(io.BytesIO(out.with_suffix(".wav").read_bytes()))
    assert rate == 16_000 and wave.shape == (16_000,)
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    assert out.with_suffix(".png").stat().st_size > 0


def test_same_seed_same_clip_other_seed_other_clip(av_ckpt, tmp_path):
    outs = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    for out, seed in zip(outs, ("3", "3", "4"), strict=True):
        assert (
            _run("--ckpt", str(av_ckpt), "--prompt", "x", "--steps", "2", "--seed", seed, "--out", str(out))
            == 0
        )
    wav = [o.with_suffix(".wav").read_bytes() for o in outs]
    assert wav[0] == wav[1] != wav[2]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_duration_and_size_overrides(av_ckpt, tmp_path):
    out = tmp_path / "long.mp4"
    args = ("--ckpt", str(av_ckpt), "--prompt", "x", "--steps", "1", "--duration", "2", "--size", "48x32")
    assert _run(*args, "--out", str(out)) == 0
    with av.open(str(out)) as box:
        assert sum(1 for _ in box.decode(video=0)) == 16
        assert (box.streams.video[0].codec_context.height, box.streams.video[0].codec_context.width) == (
            48,
            32,
        )


def test_the_shift_defaults_to_the_models_sample_shift(av_ckpt, tmp_path):
    shifted = tmp_path / "shifted"
    shutil.copytree(av_ckpt, shifted)
    text = (shifted / "config.yaml").read_text()
    assert "\n  shift: 1.0\n" in text
    (shifted / "config.yaml").write_text(text.replace("\n  shift: 1.0\n", "\n  shift: 3.0\n"))
    write_manifest(shifted)
    metas = []
    for name, extra in (("model", []), ("given", ["--shift", "1.5"])):
        out = tmp_path / f"{name}.mp4"
        assert _run("--ckpt", str(shifted), "--prompt", "x", "--steps", "2", "--out", str(out), *extra) == 0
        metas.append(json.loads(out.with_suffix(".json").read_text()))
    assert [m["shift"] for m in metas] == [3.0, 1.5]


def test_bad_input_fails_with_one_line_and_writes_nothing(av_ckpt, tmp_path, capsys):
    corrupt, truncated, mismatched = tmp_path / "corrupt", tmp_path / "truncated", tmp_path / "mismatched"
    for d in (corrupt, truncated, mismatched):
        shutil.copytree(av_ckpt, d)
    weights = bytearray((av_ckpt / "ema.safetensors").read_bytes())
    weights[8:24] = b"\x00" * 16  # the header: same size, so only reading it can tell
    (corrupt / "ema.safetensors").write_bytes(bytes(weights))
    (truncated / "ema.safetensors").write_bytes(weights[:100])  # the manifest's size check tells
    text = (mismatched / "config.yaml").read_text().replace("hidden_size: 192", "hidden_size: 96")
    (mismatched / "config.yaml").write_text(
        text.replace("axes_dim:\n  - 12\n  - 12\n  - 12\n  - 12", "axes_dim:\n  - 6\n  - 6\n  - 6\n  - 6")
    )
    write_manifest(mismatched)  # a complete checkpoint, of another model than its weights
    out = tmp_path / "bad.mp4"
    cases = [
        (["--ckpt", str(av_ckpt), "--prompt", "  "], "prompt"),
        (["--ckpt", str(av_ckpt), "--prompt", "x", "--sampler", "rk9"], "sampler"),
        (["--ckpt", str(tmp_path / "none"), "--prompt", "x"], "checkpoint"),
        (["--ckpt", str(corrupt), "--prompt", "x"], "unreadable"),
        (["--ckpt", str(truncated), "--prompt", "x"], "ema.safetensors is 100 bytes, manifest says"),
        (["--ckpt", str(mismatched), "--prompt", "x"], "do not fit"),
        (["--ckpt", str(av_ckpt), "--prompt", "x", "--fps", "7.5"], "clip spec"),
    ]
    for args, needle in cases:
        assert _run(*args, "--steps", "1", "--out", str(out)) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert _run("--ckpt", str(av_ckpt), "--prompt", "x", "--steps", "1", "--out", str(blocked / "x.mp4")) == 2
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".*tmp"))


def test_sample_video_writes_a_silent_mp4(av_ckpt, tmp_path):
    from selfflow.inference import sample_video

    out = tmp_path / "v.mp4"
    assert (
        sample_video.main(["--ckpt", str(av_ckpt), "--prompt", "x", "--steps", "1", "--out", str(out)]) == 0
    )
    with av.open(str(out)) as box:
        assert len(box.streams.video) == 1 and not box.streams.audio
    assert not out.with_suffix(".wav").exists() and out.with_suffix(".png").is_file()


def test_a_sample_does_not_depend_on_its_batch(av_ckpt):
    from selfflow.inference.pipeline import Generator, load_snapshot

    cfg, model = load_snapshot(av_ckpt)
    gen = Generator(cfg, model)
    alone = gen.generate(["b"], [7], ("video", "audio"), steps=2)
    batch = gen.generate(["a", "b", "c"], [1, 7, 9], ("video", "audio"), steps=2)
    for m in ("video", "audio"):
        torch.testing.assert_close(batch[m][1], alone[m][0], atol=1e-5, rtol=1e-5)


def test_an_av_run_draws_its_sample_grid_as_rows_of_frames(av_ckpt):
    from PIL import Image

    grid = Image.open(av_ckpt.parent.parent / "samples" / "step_00000002.png")
    assert grid.size == (8 * 34 + 2, 34 + 2)  # 1 clip (sample.num=1): 8 frames of 32 px, 2 px padding


def test_the_sampling_benchmark_tool_runs(av_ckpt, capsys):
    from selfflow.tools import bench_sample

    assert bench_sample.main(["--ckpt", str(av_ckpt), "--steps", "1", "--rounds", "1", "--images", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["preset"] == "tiny" and result["seconds_per_av_clip"] > 0 and result["seconds_per_image"] > 0
    )
    assert set(result["model_call_ms"]) == {"uncached", "cached"}


def test_a_prompt_file_gives_one_clip_per_line_whatever_the_batch(av_ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a ball\n\nthe digit 3\na drum\n")
    waves = {}
    for batch in ("1", "2"):
        out = tmp_path / f"b{batch}" / "clip.mp4"
        args = ["--ckpt", str(av_ckpt), "--prompts", str(prompts), "--steps", "2", "--batch", batch]
        assert _run(*args, "--quiet", "--seed", "5", "--out", str(out)) == 0
        names = sorted(p.name for p in out.parent.glob("*.mp4"))
        assert names == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"]
        metas = [json.loads((out.parent / f"clip_{i:03d}.json").read_text()) for i in range(3)]
        assert [(m["prompt"], m["seed"]) for m in metas] == [("a ball", 5), ("the digit 3", 6), ("a drum", 7)]
        waves[batch] = [soundfile.read(out.parent / f"clip_{i:03d}.wav")[0] for i in range(3)]
    for one, two in zip(waves["1"], waves["2"], strict=True):
        assert abs(one - two).max() < 1e-4
