"""Checkpoint publishing and discovery, and the device-side metric meter."""

from __future__ import annotations

import json
import os

import pytest
import torch

from selfflow.configs import load_config
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.tracking import MetricMeter, RunLogger, read_metrics


def _save(root, step, keep=0):
    weights = {"model": {"w": torch.full((2, 3), float(step))}}
    return ckpt_io.save_checkpoint(
        root, step, weights, {"x": torch.ones(1)}, {"k": 1}, load_config("tiny"), keep
    )


def test_save_publishes_complete_checkpoints_and_latest(tmp_path):
    first, second = _save(tmp_path, 10), _save(tmp_path, 20)
    assert ckpt_io.latest_checkpoint(tmp_path) == second
    assert (tmp_path / "latest").read_text().strip() == "step_00000020"
    torch.testing.assert_close(ckpt_io.load_weights(first, "model")["w"], torch.full((2, 3), 10.0))
    state, trainer = ckpt_io.load_state(second)
    assert state == {"k": 1, "step": 20} and torch.equal(trainer["x"], torch.ones(1))
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_or_dangling_checkpoints_are_ignored(tmp_path):
    good = _save(tmp_path, 10)
    (tmp_path / ".tmp-step_00000030-abc").mkdir()  # a crash mid-save
    half = tmp_path / "step_00000040"  # a directory without its files (not ours, or damaged)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")
    (tmp_path / "latest").write_text("step_00000050\n")  # points at nothing
    assert ckpt_io.latest_checkpoint(tmp_path) == good
    assert ckpt_io.resolve_checkpoint(tmp_path.parent / tmp_path.name) == good
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt_io.resolve_checkpoint(tmp_path / "nothing")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_meter_averages_steps_and_bins_losses_by_level():
    meter = MetricMeter(t_bins=4, device=torch.device("cpu"))
    meter.add(
        {"loss": torch.tensor(1.0)}, torch.tensor([0.1, 0.9]), torch.tensor([2.0, 4.0]), tokens_per_sample=10
    )
    meter.add(
        {"loss": torch.tensor(3.0)}, torch.tensor([0.15, 1.0]), torch.tensor([6.0, 8.0]), tokens_per_sample=10
    )
    row = meter.flush()
    assert row["loss"] == 2.0 and row["loss_rep"] == 0.0
    assert row["loss_t0"] == 4.0 and row["loss_t3"] == 6.0  # t = 1.0 falls in the last bin
    assert "loss_t1" not in row and "loss_t2" not in row
    assert row["samples_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(10 * row["samples_per_s"])
    assert meter.steps == 0  # reset after a flush


def test_logger_drops_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)))
    logger = RunLogger(tmp_path, resume_step=20, tensorboard=False)
    logger.log(30, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 1.0), (20, 1.0), (30, 0.5)]


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    from selfflow.data.atomic import atomic_path, write_atomic

    target = write_atomic(tmp_path / "sub" / "f.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["f.txt"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
