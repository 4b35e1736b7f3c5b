"""`train.trackers`: config validation, the grouped dashboard names, a run that imports no dashboard it
was not asked for, and Weights & Biases (offline) through real short runs: preempted, then resumed into
the same wandb run."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from test_train import tiny

from selfflow.configs import ConfigError, load_config
from selfflow.training import loop
from selfflow.training.main import main
from selfflow.training.trackers import metric_name
from selfflow.training.tracking import read_metrics

GROUPS = ("train", "throughput", "data", "memory", "val")


def test_trackers_default_and_validation():
    assert load_config("tiny").train.trackers == ["jsonl", "tensorboard"]
    assert load_config("tiny", ["train.trackers=[jsonl,wandb]"]).train.trackers == ["jsonl", "wandb"]
    for bad, match in [
        ("[tensorboard]", "must include jsonl"),
        ("[jsonl,mlflow]", r"unknown tracker\(s\) \['mlflow'\]"),
        ("[jsonl,tensorboard,jsonl]", "names a tracker twice"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [f"train.trackers={bad}"])


def test_metric_names_are_grouped():
    assert metric_name("lr") == "train/lr"  # was throughput/lr
    assert metric_name("loss") == "train/loss" and metric_name("loss_t3") == "train/loss_t3"
    assert metric_name("tokens_per_s") == "throughput/tokens_per_s"
    assert metric_name("samples_seen_video") == "data/samples_seen_video"
    assert metric_name("memory_peak_gib") == "memory/peak_gib" and metric_name("val_loss") == "val/loss"
    assert metric_name("something_new") == "other/something_new"


def test_jsonl_only_run_imports_no_dashboard_and_every_key_has_a_group(fmnist_shards, tmp_path, monkeypatch):
    for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # importing one now fails
    cfg = tiny(fmnist_shards, tmp_path / "run", "train.max_steps=10", "train.trackers=[jsonl]")
    loop.train(cfg, progress=False)
    run_dir = Path(cfg.run.dir)
    assert not (run_dir / "tb").exists() and not (run_dir / "wandb").exists()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in rows] == [5, 10]
    keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float) and k != "step"}
    assert {"lr", "loss", "samples_per_s", "samples_seen", "skipped_samples"} <= keys
    assert {k: metric_name(k) for k in keys if metric_name(k).split("/")[0] not in GROUPS} == {}


def test_missing_wandb_fails_before_training(fmnist_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = tmp_path / "run"
    args = [f"data.shards={fmnist_shards}", f"run.dir={run_dir}", "train.trackers=[jsonl,wandb]"]
    assert main(["--config", "tiny", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'selfflow[trackers]'" in err, err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def _records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (leveldb log format: 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type FULL=1 / FIRST / MIDDLE / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(pending))
            pending = b""
    return out


def _offline_runs(wandb_dir: Path, n: int) -> list[dict]:
    """The n offline runs under wandb_dir, oldest first (folders are named offline-run-<time>-<id>),
    once each has its exit record: wandb's service process may still be writing when finish() returns."""
    deadline = time.monotonic() + 60
    while True:
        runs = [_offline_run(p) for p in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))]
        done = all(r["exit"] is not None for r in runs) and (len(runs) == n or n < 0)  # n < 0: any number
        if done or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _offline_run(path: Path) -> dict:
    """id, name, config, history rows {name: value} by step and exit code of an offline run."""
    run: dict = {"history": {}, "exit": None}
    for rec in _records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": rec.run.run_id, "name": rec.run.display_name, "project": rec.run.project}
            run["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in rec.history.item
            }
            run["history"][row["step"]] = row  # the training step (wandb's own _step only counts rows)
        elif kind == "exit":
            run["exit"] = rec.exit.exit_code
    return run


def test_wandb_offline_run_is_preempted_then_resumed_into_the_same_run(fmnist_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "my-run"
    extra = ("train.max_steps=10", "train.trackers=[jsonl,wandb]", "train.wandb_project=selfflow-test")
    cfg = tiny(fmnist_shards, run_dir, *extra)
    stop_at_5 = loop._stop_signal
    monkeypatch.setattr(
        loop, "_stop_signal", lambda tr, stop: "SIGTERM" if tr.step == 5 else stop_at_5(tr, stop)
    )
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb reads it once per process
    assert loop.train(cfg, progress=False)["preempted"] == "SIGTERM"
    (first,) = _offline_runs(tmp_path, 1)
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert first["id"] == run_id and first["name"] == "my-run" and first["project"] == "selfflow-test"
    assert first["exit"] == 0, "the preempted run did not finish its wandb run"
    assert first["config"]["train"]["max_steps"] == 10 and first["config"]["train"]["trackers"] == [
        "jsonl",
        "wandb",
    ]
    row = first["history"][5]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert row["train/loss"] == pytest.approx(rows[0]["loss"]) and row["train/lr"] == rows[0]["lr"]
    assert {"train/grad_norm", "train/loss_gen", "throughput/samples_per_s", "data/samples_seen"} <= set(row)
    assert not any(k.startswith("other/") for k in row)

    monkeypatch.setattr(loop, "_stop_signal", stop_at_5)
    loop.train(cfg, progress=False)
    _, second = _offline_runs(tmp_path, 2)
    assert second["id"] == run_id and (run_dir / "wandb_id").read_text().strip() == run_id
    assert sorted(second["history"]) == [10] and second["exit"] == 0
    assert second["history"][10]["data/samples_seen"] == 10 * 16


def test_wandb_keeps_the_steps_a_resumed_run_repeats(tmp_path, monkeypatch):
    """A crash after the last checkpoint: the resumed run logs steps again that wandb has seen. Logged as
    the `step` metric (not wandb's step), they are kept instead of dropped."""
    pytest.importorskip("wandb")
    from selfflow.training.trackers import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = load_config("tiny", [f"run.dir={tmp_path / 'crashed'}", "train.trackers=[jsonl,wandb]"])
    tracker = WandbTracker(cfg)
    run_id = tracker.run.id
    for step, loss in ((10, 1.0), (20, 0.5), (10, 0.9)):  # 20 was logged, then the run resumed at 10
        tracker.log(step, {"train/loss": loss})
    tracker.close()
    wandb_dir = Path(tracker.run.dir).parents[2]  # <WANDB_DIR>/wandb/offline-run-*/files (read once)
    (run,) = [r for r in _offline_runs(wandb_dir, -1) if r["id"] == run_id]
    assert sorted(run["history"]) == [10, 20] and run["history"][10]["train/loss"] == 0.9
