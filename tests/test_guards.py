"""Failure behaviour of a training run: a NaN / Inf step is never applied (and enough of them in a row
stop the run), a preemption signal saves at the next step boundary and exits 0 so that a relaunch
resumes, and a save killed half-way leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfflow.configs import ConfigError, load_config
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.guards import Preemption, signal_number
from selfflow.training.loop import build_trainer, make_batch, train, train_step
from selfflow.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _cfg(shards: Path, run_dir: Path, *extra: str):
    base = [f"data.shards={shards}", f"run.dir={run_dir}", "train.batch_size=4", "train.log_every=1",
            "train.warmup_steps=0", "sample.num=1", "sample.steps=1"]  # fmt: skip
    return load_config("tiny", [*base, *extra])


def _main(shards: Path, run: Path) -> list[str]:
    """training/main.py on the tiny preset, batch 4, logging every step."""
    return [sys.executable, "training/main.py", "--config", "tiny", "--no-progress",
            f"data.shards={shards}", f"run.dir={run}", "train.batch_size=4", "train.log_every=1",
            "sample.num=1", "sample.steps=1"]  # fmt: skip


def _batch(tr, poison: bool):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if poison:
        pixels[1, 0, 3, 3] = float("nan")  # one bad pixel in one sample
    return make_batch(tr, {"image": pixels}, ["a bag"] * 4)


def test_a_nonfinite_step_changes_no_weight_optimizer_or_ema_state(fmnist_shards, tmp_path):
    tr = build_trainer(_cfg(fmnist_shards, tmp_path, "train.ema_decay=0.5"))
    train_step(tr, _batch(tr, poison=False))  # the optimizer has state now
    snap = {
        "model": {k: v.clone() for k, v in tr.models.student.state_dict().items()},
        "ema": {k: v.clone() for k, v in tr.ema.weights().items()},
        "adam": [s["exp_avg"].clone() for s in tr.optimizer.state.values()],
        "lr_steps": tr.scheduler.last_epoch,
    }
    out = train_step(tr, _batch(tr, poison=True))
    assert not torch.isfinite(out.loss).all()
    assert (tr.step, tr.nonfinite, tr.nonfinite_streak) == (2, 1, 1)
    assert all(torch.equal(v, tr.models.student.state_dict()[k]) for k, v in snap["model"].items())
    assert all(torch.equal(v, tr.ema.weights()[k]) for k, v in snap["ema"].items())
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(snap["adam"], tr.optimizer.state.values(), strict=True)
    )
    assert tr.scheduler.last_epoch == snap["lr_steps"]
    assert all(p.grad is None for p in tr.models.student.parameters())  # nothing carried to the next step
    train_step(tr, _batch(tr, poison=False))
    assert (tr.nonfinite, tr.nonfinite_streak) == (1, 0)
    assert any(not torch.equal(v, tr.models.student.state_dict()[k]) for k, v in snap["model"].items())


def test_a_diverging_run_logs_the_bad_batches_and_stops_after_k(fmnist_shards, tmp_path):
    """Injection by divergence: lr 1e30 makes every step after the first non-finite."""
    run = tmp_path / "run"
    cmd = [*_main(fmnist_shards, run), "train.lr=1e30", "train.warmup_steps=0", "train.max_nonfinite=3",
           "train.max_steps=20"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert "3 consecutive steps with a non-finite loss" in done.stderr
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "nonfinite_step"]
    assert [e["streak"] for e in events] == [1, 2, 3] and [e["step"] for e in events] == [2, 3, 4]
    assert all(len(e["keys"]) == 4 and e["keys"][0].startswith("fmnist_") for e in events)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "event" not in r]
    assert all("loss" not in r for r in rows if r["step"] > 1)  # no fake means for skipped steps


def test_preemption_signals_are_validated_and_recorded():
    assert signal_number("term") == signal.SIGTERM and signal_number("SIGUSR1") == signal.SIGUSR1
    with pytest.raises(ValueError, match="unknown signal"):
        signal_number("SIGNOPE")
    with pytest.raises(ConfigError, match="preempt_signals"):
        load_config("tiny", ["train.preempt_signals=[SIGNOPE]"])
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(["SIGUSR1"]) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_at_the_step_boundary_and_a_relaunch_resumes(fmnist_shards, tmp_path, sig):
    run = tmp_path / "run"
    cmd = [*_main(fmnist_shards, run), "train.ckpt_every=1000", "train.preempt_signals=[SIGTERM,SIGUSR1]"]
    proc = subprocess.Popen(
        [*cmd, "train.max_steps=500"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(read_metrics(metrics)) >= 2)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    stopped = summary["step"]
    assert summary["preempted"] == sig and 2 <= stopped < 500
    assert ckpt_io.latest_checkpoint(run / "checkpoints").name == ckpt_io.checkpoint_name(stopped)
    assert read_metrics(metrics)[-1] == {"step": stopped, "event": "preempted", "signal": sig}
    again = subprocess.run(
        [*cmd, f"train.max_steps={stopped + 2}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == stopped + 2
    state = json.loads((ckpt_io.latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert state["step"] == stopped + 2 and state["samples_seen"] == 4 * (stopped + 2)


KILLED_SAVE = """
import sys, torch
from selfflow.configs import load_config
from selfflow.training.checkpoint import save_checkpoint
root, cfg = sys.argv[1], load_config("tiny")
save_checkpoint(root, 1, {"model": {"w": torch.ones(4)}}, {}, {}, cfg)
print("first saved", flush=True)
big = {f"w{i}": torch.randn(2_000_000) for i in range(64)}  # ~512 MB: a save that takes a while
save_checkpoint(root, 2, {"model": big}, {}, {}, cfg)
"""


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "first saved"
    _wait_for(
        lambda: any(p.name.startswith(".tmp-step_00000002") and any(p.iterdir()) for p in root.iterdir())
    )
    proc.kill()  # SIGKILL while step 2 is being written
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = ckpt_io.latest_checkpoint(root)
    assert latest.name == ckpt_io.checkpoint_name(1)
    assert torch.equal(ckpt_io.load_weights(latest, "model")["w"], torch.ones(4))
    assert [p.name for p in ckpt_io.list_checkpoints(root)] == [ckpt_io.checkpoint_name(1)]
    ckpt_io.save_checkpoint(
        root, 3, {"model": {"w": torch.zeros(4)}}, {}, {}, load_config("tiny"), keep_last=2
    )
    assert not list(root.glob(".tmp-*"))  # the next save clears the half-written one


# ---------------------------------------------------------------- damaged checkpoints on resume


def _short_run(shards: Path, run: Path, steps: int) -> Path:
    """A finished run of `steps` steps with a checkpoint every 2; returns its checkpoints folder."""
    train(_cfg(shards, run, f"train.max_steps={steps}", "train.ckpt_every=2", "train.keep_last=0"), False)
    return run / "checkpoints"


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_skips_a_damaged_newer_checkpoint_and_says_why(fmnist_shards, tmp_path):
    run = tmp_path / "run"
    model = _short_run(fmnist_shards, run, 4) / "step_00000004" / "model.safetensors"
    size = model.stat().st_size
    model.write_bytes(b"")  # what a power cut can leave of a file renamed before it reached the disk
    cmd = [*_main(fmnist_shards, run), "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reason = f"step_00000004: model.safetensors is 0 bytes, manifest says {size}"
    assert reason in done.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r for r in rows if r.get("event")] == [
        {"step": 2, "event": "checkpoint_skipped", "reason": reason}
    ]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # 3 and 4 again, once each
    assert ckpt_io.check_checkpoint(model.parent) is None  # written again by the resumed run


def test_no_usable_checkpoint_stops_the_run_unless_restart_is_set(fmnist_shards, tmp_path):
    run = tmp_path / "run"
    model = _short_run(fmnist_shards, run, 2) / "step_00000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a full disk, say
    (run / "wandb_id").write_text("abc123\n")  # as train.trackers=[jsonl,wandb] leaves it
    before = _files(run)
    cmd = [*_main(fmnist_shards, run), "train.max_steps=3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "none is usable" in done.stderr and "train.restart=true" in done.stderr
    assert "step_00000002: model.safetensors is" in done.stderr
    assert _files(run) == before  # not a byte changed: metrics.jsonl, checkpoints, config
    again = subprocess.run(
        [*cmd, "train.restart=true"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 3
    (aside,) = run.glob("unusable-*")
    moved = ("checkpoints", "metrics", "wandb_id")  # starting over is a new wandb run
    assert _files(aside) == {k: v for k, v in before.items() if k.startswith(moved)}
    assert not (run / "wandb_id").exists()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["event"] for r in rows[:2]] == ["checkpoint_skipped", "restarted"]
    assert rows[1] == {"step": 0, "event": "restarted", "moved_to": str(aside)}
    assert [r["step"] for r in rows[2:]] == [1, 2, 3]


def test_a_damaged_checkpoint_that_passes_the_size_check_exits_2_naming_the_file(fmnist_shards, tmp_path):
    run = tmp_path / "run"
    model = _short_run(fmnist_shards, run, 2) / "step_00000002" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[8:24] = b"\x00" * 16  # the JSON header of the safetensors file, same size
    model.write_bytes(bytes(data))
    done = subprocess.run(
        [*_main(fmnist_shards, run), "train.max_steps=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert str(model) in done.stderr and "Traceback" not in done.stderr


def test_a_run_resumes_over_a_torn_last_metrics_line(fmnist_shards, tmp_path):
    run = tmp_path / "run"
    _short_run(fmnist_shards, run, 2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.12')  # the append a kill cut short
    train(_cfg(fmnist_shards, run, "train.max_steps=3", "train.ckpt_every=2"), False)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss" in rows[-1]
    assert (run / "metrics.jsonl").read_text().count("\n") == 3


# ---------------------------------------------------------------- one job per run.dir


def _tree(run: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `run`."""
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in sorted(run.rglob("*"))}


def test_a_second_launch_into_a_live_run_exits_2_touching_nothing(fmnist_shards, tmp_path, hold_run_lock):
    import socket

    run = tmp_path / "run"
    _short_run(fmnist_shards, run, 2)
    (run / "checkpoints" / ".tmp-step_00000004-x").mkdir()  # the live run's save in progress
    holder = hold_run_lock(run)
    before = _tree(run)
    cmd = [*_main(fmnist_shards, run), "train.max_steps=3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: run.dir {run} is in use by pid {holder.pid} on host ")
    assert socket.gethostname() in done.stderr and "(since 20" in done.stderr
    assert _tree(run) == before
    holder.kill()  # dies without releasing anything: its lock dies with it
    holder.wait(timeout=60)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 3
    assert (run / ".lock").read_text() == ""  # released on exit, record cleared


def test_shards_without_a_usable_sample_exit_2_with_one_line(tmp_path):
    """The data pipeline's DataError is bad input, like a bad config: one line, exit 2."""
    from selfflow.data.shards import ShardWriter

    (tmp_path / "shards").mkdir()
    with ShardWriter(tmp_path / "shards", "audio", max_samples=2) as w:
        for i in range(3):
            w.write({"__key__": f"bad_{i}", "flac": b"not a flac file", "txt": "static"})
    cmd = _main(tmp_path / "shards", tmp_path / "run")
    done = subprocess.run([*cmd, "train.max_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: audio: a whole epoch of this process")


# ---------------------------------------------------------------- preemption during a sample grid


def test_the_generator_stops_within_one_model_forward(tiny_cfg, tiny_model):
    from selfflow.inference.pipeline import Generator
    from selfflow.inference.samplers import SamplingStopped

    forwards = []
    tiny_model.register_forward_hook(lambda *_: forwards.append(1))
    gen = Generator(tiny_cfg, tiny_model)
    with pytest.raises(SamplingStopped):  # CFG: a conditional and an unconditional forward per step
        gen.generate(["a bag"], [0], steps=100, cfg_scale=3.0, should_stop=lambda: len(forwards) >= 5)
    assert len(forwards) == 5


def test_a_signal_during_a_sample_grid_stops_it_and_saves(fmnist_shards, tmp_path):
    """Grids every 2 steps, each of many sampler steps. The first (step 2) runs to its end and shows how
    long a grid takes; SIGTERM during the second (step 4) abandons it: the run saves step 4 and exits 0
    in a fraction of that time, with no grid for step 4."""
    run = tmp_path / "run"
    cmd = [*_main(fmnist_shards, run), "train.max_steps=6", "train.ckpt_every=1000", "sample.every=2",
           "sample.steps=800"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"

    def logged(step: int) -> float:
        _wait_for(lambda: metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)))
        return time.monotonic()

    grid_started = logged(2)  # rows are logged before that step's grid is drawn
    grid_time = logged(3) - grid_started
    logged(4)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=300)
    stopping_time = time.monotonic() - signalled
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] == "SIGTERM" and summary["step"] == 4
    assert ckpt_io.latest_checkpoint(run / "checkpoints").name == ckpt_io.checkpoint_name(4)
    assert (run / "samples" / "step_00000002.png").is_file()
    assert not (run / "samples" / "step_00000004.png").exists() and not list((run / "samples").glob(".*"))
    assert stopping_time < grid_time / 3, (stopping_time, grid_time)
