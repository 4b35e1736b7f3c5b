"""Checkpoint publishing and discovery, and the device-side metric meter."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    logger = RunLogger(tmp_path, resume_step=20)
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


def _fsyncs(monkeypatch) -> list[str]:
    """Spy on os.fsync (the real call still happens): the path of every file or folder flushed, in order,
    with the renames (os.replace) interleaved as "rename <src> -> <dst>"."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename {src} -> {dst}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps descriptors to paths through /proc")
def test_every_file_the_folder_the_parent_and_latest_are_fsynced_before_they_count(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    events = _fsyncs(monkeypatch)
    final = _save(tmp_path, 2, keep=1)
    renames = [i for i, e in enumerate(events) if e.startswith("rename ") and e.endswith(str(final))]
    assert len(renames) == 1
    before, after = events[: renames[0]], events[renames[0] + 1 :]
    tmp = Path(events[renames[0]].split()[1])
    files = {p.name for p in final.iterdir()}
    assert files == {"model.safetensors", "trainer.pt", "state.json", "config.yaml", "manifest.json"}
    assert {str(tmp / name) for name in files} <= set(before)  # every file, before the rename ...
    assert before.index(str(tmp / "manifest.json")) > max(
        before.index(str(tmp / n)) for n in files - {"manifest.json"}
    )
    assert before[-1] == str(tmp)  # ... then the folder itself
    assert after[0] == str(tmp_path)  # the parent, after the rename
    latest = [
        i for i, e in enumerate(after) if e.startswith("rename ") and e.endswith(str(tmp_path / "latest"))
    ]
    assert len(latest) == 1 and after[latest[0] - 1].startswith(str(tmp_path / ".latest."))  # file, rename,
    assert after[latest[0] + 1] == str(tmp_path)  # folder
    assert not (tmp_path / "step_00000001").exists()  # pruned, after all of that


def test_manifest_lists_every_file_with_its_size(tmp_path):
    final = _save(tmp_path, 10)
    files = json.loads((final / "manifest.json").read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in final.iterdir() if p.name != "manifest.json"}
    assert {name: entry["size"] for name, entry in files.items()} == on_disk
    assert ckpt_io.check_checkpoint(final) is None


def test_a_truncated_or_missing_file_makes_the_newest_checkpoint_incomplete(tmp_path):
    """What a power cut after a rename without fsync, or a full disk, leaves: the name, not the data."""
    first, second, third = _save(tmp_path, 10), _save(tmp_path, 20), _save(tmp_path, 30)
    size = (third / "model.safetensors").stat().st_size
    state_size = (second / "state.json").stat().st_size
    (third / "model.safetensors").write_bytes(b"")
    (second / "state.json").unlink()
    found, skipped = ckpt_io.scan_checkpoints(tmp_path)
    assert found == first and ckpt_io.latest_checkpoint(tmp_path) == first
    assert skipped == [
        f"step_00000030: model.safetensors is 0 bytes, manifest says {size}",
        f"step_00000020: state.json is missing, manifest says {state_size} bytes",
    ]
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_00000010"]


def test_checkpoints_without_a_manifest_follow_the_old_rule(tmp_path):
    """Written by an earlier version: complete when the required files are present and not empty."""
    old = _save(tmp_path, 10)
    (old / "manifest.json").unlink()
    assert ckpt_io.check_checkpoint(old) is None and ckpt_io.latest_checkpoint(tmp_path) == old
    (old / "config.yaml").write_bytes(b"")
    assert "config.yaml" in ckpt_io.check_checkpoint(old)
    assert ckpt_io.latest_checkpoint(tmp_path) is None and ckpt_io.has_checkpoints(tmp_path)


def test_every_rank_files_are_in_the_manifest(tmp_path):
    """save_checkpoint_ranks with two ranks as two threads meeting at a real barrier."""
    import threading

    meet = threading.Barrier(2)
    cfg, errors = load_config("tiny"), []

    def rank(r: int) -> None:
        main = ({"model": {"w": torch.ones(3)}}, {"x": torch.ones(1)}, {"k": 1}, cfg) if r == 0 else None
        try:
            ckpt_io.save_checkpoint_ranks(
                tmp_path, 5, r, meet.wait, main, ({"g": torch.ones(r + 1)}, {"r": r})
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    final = ckpt_io.latest_checkpoint(tmp_path)
    files = json.loads((final / "manifest.json").read_text())["files"]
    assert {
        "rank_00000.pt",
        "rank_00000.json",
        "rank_00001.pt",
        "rank_00001.json",
        "model.safetensors",
    } <= set(files)
    (final / "rank_00001.pt").write_bytes(b"x")
    assert "rank_00001.pt is 1 bytes" in ckpt_io.check_checkpoint(final)


def test_a_damaged_file_that_passes_the_size_check_is_a_checkpoint_error(tmp_path):
    final = _save(tmp_path, 10)
    for name in ("model.safetensors", "trainer.pt", "state.json"):
        path = final / name
        data = bytearray(path.read_bytes())
        data[:16] = b"\xff" * 16  # the header / zip signature / JSON start, same size
        path.write_bytes(bytes(data))
    assert ckpt_io.check_checkpoint(final) is None  # sizes match: only reading can tell
    with pytest.raises(ckpt_io.CheckpointError, match="model.safetensors is damaged"):
        ckpt_io.load_weights(final, "model")
    with pytest.raises(ckpt_io.CheckpointError, match="state.json is damaged"):
        ckpt_io.load_state(final)
    (final / "state.json").write_text(json.dumps({"k": 1, "step": 10}))
    with pytest.raises(ckpt_io.CheckpointError, match="trainer.pt is damaged"):
        ckpt_io.load_state(final)


def _rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)


def test_a_torn_last_metrics_line_is_dropped_and_rewritten_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(10, 20) + '{"step": 30, "lo')  # killed mid-append
    assert [r["step"] for r in read_metrics(path)] == [10, 20]
    logger = RunLogger(tmp_path, resume_step=20)
    assert path.read_text() == _rows(10, 20)  # rewritten before anything is appended
    logger.log(30, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_last_row_without_its_newline_is_not_merged_with_the_next(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(10, 20).rstrip("\n"))  # killed between the row and its newline
    RunLogger(tmp_path, resume_step=20).log(30, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]


def test_a_damaged_metrics_line_in_the_middle_is_an_error_naming_it(tmp_path):
    from selfflow.training.tracking import MetricsError

    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(10) + '{"step": 20, "lo\n' + _rows(30))
    with pytest.raises(MetricsError, match="line 2 is not a JSON row"):
        read_metrics(path)


def test_the_benchmark_reads_a_log_with_a_torn_last_line(tmp_path):
    from selfflow.tools.benchmark_run import rep_cos_curve

    rows = "".join(json.dumps({"step": s, "rep_cos": s / 100}) + "\n" for s in (5, 10))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 15, "rep_c')
    assert rep_cos_curve(tmp_path) == [[5, 0.05], [10, 0.1]]
