"""The training loop on real Fashion-MNIST shards: one step, a short run that learns, checkpoints,
resume, and the command-line contracts of training/main.py and inference/sample_image.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfflow.configs import ConfigError, load_config
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.loop import build_trainer, make_batch, restore, save, train, train_step
from selfflow.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny(shards: Path, run_dir: Path, *extra: str):
    base = [
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.batch_size=16",
        "train.log_every=5",
        "train.lr=1e-3",
        "train.teacher_decay=0.9",
        "sample.num=4",
        "sample.steps=4",
    ]
    return load_config("tiny", [*base, *extra])


def _batch(tr, n: int = 8):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1
    return make_batch(tr, {"image": pixels}, [f"a photo of item {i}" for i in range(n)])


def test_train_step_moves_student_and_emas_but_never_grads_the_teacher(fmnist_shards, tmp_path):
    tr = build_trainer(tiny(fmnist_shards, tmp_path, "train.ema_decay=0.5"))
    assert tr.teacher_ema is not tr.ema and tr.models.teacher is tr.teacher_ema.model
    before = {k: v.clone() for k, v in tr.models.student.state_dict().items()}
    ema_before = {k: v.clone() for k, v in tr.ema.weights().items()}
    out = train_step(tr, _batch(tr))
    assert tr.step == 1 and tr.samples_seen == 8
    assert {"loss", "loss_gen", "loss_rep", "rep_cos", "grad_norm"} <= set(out.metrics)
    assert all(p.grad is None for p in tr.models.teacher.parameters())
    after = tr.models.student.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "the optimizer step changed nothing"
    for k in moved:  # EMA with decay 0.5: exactly halfway between the old EMA and the new student
        torch.testing.assert_close(tr.ema.weights()[k], 0.5 * ema_before[k] + 0.5 * after[k])


@pytest.fixture(scope="module")
def short_run(fmnist_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny(fmnist_shards, run_dir, "train.max_steps=50", "train.ckpt_every=25", "train.keep_last=1")
    return cfg, train(cfg, progress=False)


def test_fifty_steps_lower_the_loss_and_log_the_contract(short_run):
    cfg, summary = short_run
    rows = read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 51, 5))
    for key in ("loss", "loss_gen", "loss_rep", "rep_cos", "samples_per_s", "tokens_per_s", "mask_frac"):
        assert all(key in r for r in rows), key
    assert any(k.startswith("loss_t") for k in rows[-1])
    first, last = rows[0]["loss_gen"], sum(r["loss_gen"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert summary["step"] == 50


def test_run_writes_checkpoints_samples_and_config(short_run):
    cfg, summary = short_run
    run_dir = Path(cfg.run.dir)
    ckpts = ckpt_io.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000050"]  # keep_last=1 pruned step 25
    names = {p.name for p in ckpts[0].iterdir()}
    assert {"model.safetensors", "ema.safetensors", "ema_teacher.safetensors", "head.safetensors"} <= names
    assert load_config(ckpts[0] / "config.yaml") == cfg
    grid = Image.open(run_dir / "samples" / "step_00000050.png")
    assert grid.size[0] > 32 and grid.size[1] > 32
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run_dir / "tb")).Reload().Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/loss_t0", "throughput/tokens_per_s", "data/samples_seen"} <= tags
    assert all(t.split("/")[0] in ("train", "throughput", "data") for t in tags), tags


def test_rerun_resumes_from_latest_and_continues(short_run, tmp_path):
    cfg, _ = short_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(cfg.run.dir, run_dir)
    saved = ckpt_io.latest_checkpoint(run_dir / "checkpoints")
    # a crash mid-save leaves a temporary folder; it must be ignored
    (run_dir / "checkpoints" / ".tmp-step_00000099-x").mkdir()
    cfg2 = tiny(Path(cfg.data.shards), run_dir, "train.max_steps=60", "train.ckpt_every=25")
    tr = build_trainer(cfg2)
    restore(tr, saved)
    assert tr.step == 50 and tr.samples_seen == 800
    torch.testing.assert_close(tr.models.student.state_dict(), ckpt_io.load_weights(saved, "model"))
    assert tr.optimizer.state_dict()["state"], "optimizer moments were not restored"
    train(cfg2, progress=False)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["samples_seen"] == 60 * 16
    assert ckpt_io.latest_checkpoint(run_dir / "checkpoints").name == "step_00000060"


def test_resume_refuses_a_different_model(short_run, tmp_path):
    cfg, _ = short_run
    other = tiny(Path(cfg.data.shards), Path(cfg.run.dir), "model.hidden_size=96", "model.axes_dim=[6,6,6,6]")
    with pytest.raises(ConfigError, match="model.hidden_size"):
        train(other, progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def test_main_cli_errors_are_one_line(tmp_path):
    bad_key = _cli("training/main.py", "--config", "configs/tiny.yaml", "train.max_stepz=3")
    assert bad_key.returncode == 2 and "train.max_stepz" in bad_key.stderr
    assert len(bad_key.stderr.strip().splitlines()) == 1
    no_data = _cli("training/main.py", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}")
    assert no_data.returncode == 2 and "data.shards" in no_data.stderr


def test_sample_image_cli(short_run, tmp_path):
    cfg, _ = short_run
    out = tmp_path / "grid.png"
    ok = _cli(
        "inference/sample_image.py",
        "--ckpt",
        cfg.run.dir,
        "--prompt",
        "a photo of a bag",
        "--prompt",
        "a photo of a sneaker",
        "--num",
        "3",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 per row, 2 rows of 32 px + 2 px padding
    for args, needle in (
        (["--prompt", " "], "prompt"),
        (["--prompt", "x", "--sampler", "rk9"], "sampler"),
        (["--prompt", "x", "--ckpt", str(tmp_path / "nope")], "checkpoint"),
    ):
        ckpt = [] if "--ckpt" in args else ["--ckpt", cfg.run.dir]
        bad = _cli("inference/sample_image.py", *ckpt, *args, "--out", str(tmp_path / "bad.png"))
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert not (tmp_path / "bad.png").exists()


def test_state_json_records_counters(short_run):
    cfg, _ = short_run
    ckpt = ckpt_io.latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 50 and state["samples_seen"] == 800 and state["ema"]["num_updates"] == 50


def test_repa_trains_with_a_local_vision_encoder_that_stays_out_of_checkpoints(fmnist_shards, tmp_path):
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "dino")
    cfg = tiny(
        fmnist_shards, tmp_path / "run", "objective.name=repa", f"objective.repa_encoder={tmp_path / 'dino'}"
    )
    tr = build_trainer(cfg)
    optimized = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in tr.models.encoder.parameters())
    out = train_step(tr, _batch(tr))
    assert torch.isfinite(out.loss).all() and 0 < out.metrics["loss_rep"].item() < 2
    ckpt = save(tr, Path(cfg.run.dir))
    saved = set().union(*(ckpt_io.load_weights(ckpt, n).keys() for n in ("model", "ema", "head")))
    assert not any("embeddings" in k or "encoder" in k for k in saved)
    missing = load_config("tiny", [f"data.shards={fmnist_shards}", "objective.name=repa"])
    with pytest.raises(ConfigError, match="repa_encoder"):
        build_trainer(missing)


@pytest.mark.gpu
def test_train_step_on_cuda_with_bf16_autocast(fmnist_shards, tmp_path):
    tr = build_trainer(tiny(fmnist_shards, tmp_path, "train.device=cuda"))
    assert tr.device.type == "cuda" and tr.generator.device.type == "cuda"
    out = train_step(tr, _batch(tr))
    assert torch.isfinite(out.loss).all() and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.ema.model.parameters())


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_run_resumes_exactly(fmnist_shards, tmp_path, workers):
    """K steps, stop, resume to 2K == 2K straight: same logged losses, same weights (CPU, bitwise)."""
    common = ("train.batch_size=8", "train.log_every=1", "train.ckpt_every=4", "train.teacher_decay=-1")
    common = (*common, f"data.num_workers={workers}")
    straight = tiny(fmnist_shards, tmp_path / "a", "train.max_steps=8", *common)
    train(straight, progress=False)
    train(tiny(fmnist_shards, tmp_path / "b", "train.max_steps=4", *common), progress=False)
    train(tiny(fmnist_shards, tmp_path / "b", "train.max_steps=8", *common), progress=False)
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("a", "b")]
    assert [r["step"] for r in rows[1]] == list(range(1, 9))
    for key in ("loss", "loss_gen", "rep_cos", "grad_norm"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    a, b = (ckpt_io.latest_checkpoint(tmp_path / d / "checkpoints") for d in ("a", "b"))
    for name in ("model", "ema", "head"):
        wa, wb = ckpt_io.load_weights(a, name), ckpt_io.load_weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_training_mixes_video_audio_and_image_tasks(mixed_shards, tmp_path):
    cfg = tiny(
        mixed_shards,
        tmp_path,
        "train.max_steps=6",
        "train.log_every=1",
        "data.weights={image: 1, av: 2, audio: 1}",
        "data.batch_sizes={av: 2, audio: 2}",
        "train.batch_size=4",
    )
    train(cfg, progress=False)
    logged = read_metrics(tmp_path / "metrics.jsonl")
    rows = [r for r in logged if "loss" in r]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert all("skipped_samples" in r for r in rows)
    per_task = {t: rows[-1].get(f"samples_seen_{t}", 0) for t in ("image", "av", "audio")}
    assert sum(per_task.values()) == rows[-1]["samples_seen"] and per_task["av"] > 0
    events = [r for r in logged if r.get("event") == "skipped_sample"]
    assert len(events) == rows[-1]["skipped_samples"]
    assert {e["sample"].split(":")[-1] for e in events} <= {"av_bad_trunc", "av_bad_nocap", "audio_bad_empty"}
    state = json.loads((ckpt_io.latest_checkpoint(tmp_path / "checkpoints") / "state.json").read_text())
    assert sum(s["position"] for s in state["data"]["streams"].values()) > 0


def test_step_benchmark_times_every_objective_side_by_side():
    import argparse

    from selfflow.tools.bench_step import bench

    args = argparse.Namespace(
        preset="tiny", objectives=["vanilla", "self_flow"], task="av", batch=2, steps=1, rounds=1, warmup=0,
        device="cpu", overrides=[],
    )  # fmt: skip
    result = bench(args)
    assert set(result["seconds_per_step"]) == {"vanilla", "self_flow"} and result["ratio"]["vanilla"] == 1.0
    assert all(t > 0 for t in result["seconds_per_step"].values())


def test_init_from_starts_a_fresh_run_from_trained_weights(short_run, fmnist_shards, tmp_path):
    cfg, _ = short_run
    source = ckpt_io.latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
    run = tmp_path / "finetune"
    tuned = tiny(fmnist_shards, run, "train.max_steps=2", f"train.init_from={cfg.run.dir}", "train.lr=1e-9")
    train(tuned, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[0] == {"step": 0, "event": "init_from", "source": str(source)}
    state = json.loads((ckpt_io.latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert state["step"] == 2 and state["samples_seen"] == 32  # a fresh count, not the source's 50 steps
    trained = ckpt_io.load_weights(source, "model")
    after = ckpt_io.load_weights(ckpt_io.latest_checkpoint(run / "checkpoints"), "model")
    assert all(torch.allclose(trained[k], after[k], atol=1e-5) for k in trained)  # lr 1e-9: barely moved
    wide = tiny(fmnist_shards, tmp_path / "wide", "model.hidden_size=96", "model.num_heads=2",
                f"train.init_from={source}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.init_from .*: tensor null_txt has shape \(192,\), this"):
        train(wide, progress=False)
