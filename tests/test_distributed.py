"""Several processes on the CPU (gloo): torchrun with gradient all-reduce (dist.engine=ddp) and DeepSpeed
ZeRO-2 / ZeRO-3 (DS_ACCELERATOR=cpu). The multi-process tests are marked slow; this file doubles as the
worker script they launch (`torchrun ... tests/test_distributed.py <mode> <out> [overrides]`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfflow.configs import ConfigError, load_config
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.distributed import Dist, deepspeed_config
from selfflow.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# A very small model, so that two processes sharing part of a core take seconds per run.
SMALL = ("model.hidden_size=32", "model.num_heads=2", "model.axes_dim=[4,4,4,4]", "model.depth_double=1",
         "model.depth_single=1", "text.max_len=8", "train.batch_size=2", "train.log_every=1",
         "train.warmup_steps=0", "train.ema_decay=0.5", "sample.num=1", "sample.steps=1",
         "data.shuffle_buffer=4")  # fmt: skip
ENGINES = {"ddp": ("dist.engine=ddp",), "fsdp": ("dist.engine=fsdp",),
           "zero2": ("dist.engine=deepspeed", "dist.zero_stage=2"),
           "zero3": ("dist.engine=deepspeed", "dist.zero_stage=3")}  # fmt: skip


def small_cfg(shards: Path | str, run_dir: Path | str, *extra: str):
    return load_config("tiny", [f"data.shards={shards}", f"run.dir={run_dir}", *SMALL, *extra])


def needs(engine: str) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="dist.engine=deepspeed needs `pip install '.[deepspeed]'`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, launcher: str = "torchrun", timeout: int = 300) -> subprocess.CompletedProcess:
    """Two processes on this machine under torchrun or the deepspeed launcher; fails the test with the
    tail of their output."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    if launcher == "deepspeed":
        ds = Path(sys.executable).with_name("deepspeed")
        cmd = [str(ds), "--num_gpus", "2", "--master_port", str(_free_port()), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


# ---------------------------------------------------------------- in-process checks


def test_ranks_read_disjoint_shards(shards, tmp_path):
    from selfflow.training.loop import build_data

    cfg = small_cfg(shards, tmp_path)
    keys = []
    for rank in (0, 1):
        data = build_data(cfg, Dist(rank=rank, world=2))
        keys.append({k for _ in range(6) for k in next(data).keys})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_deepspeed_config_comes_from_the_training_config(shards, tmp_path):
    cfg = small_cfg(shards, tmp_path, "dist.engine=deepspeed", "dist.zero_stage=3", "train.grad_clip=0.5")
    ds = deepspeed_config(cfg, world=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 8
    accum = deepspeed_config(small_cfg(shards, tmp_path, "train.grad_accum=3"), world=4)
    assert accum["gradient_accumulation_steps"] == 3 and accum["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="grad_accum > 1 needs a ZeRO stage"):
        deepspeed_config(small_cfg(shards, tmp_path, "train.grad_accum=2", "dist.zero_stage=0"), world=2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "optimizer" not in ds
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5}))
    merged = deepspeed_config(
        small_cfg(shards, tmp_path, *ENGINES["zero3"], f"dist.deepspeed_config={user}"), 2
    )
    assert (
        merged["zero_optimization"] == {"stage": 3, "overlap_comm": True} and merged["steps_per_print"] == 5
    )
    for bad, needle in (({"train_micro_batch_size_per_gpu": 64}, "train_micro_batch_size_per_gpu"),
                        ({"optimizer": {"type": "Adam"}}, "optimizer"),
                        ({"zero_optimization": {"stage": 2}}, "dist.zero_stage=2")):  # fmt: skip
        user.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=needle):
            deepspeed_config(
                small_cfg(shards, tmp_path, *ENGINES["zero3"], f"dist.deepspeed_config={user}"), 2
            )
    for override, needle in (("dist.zero_stage=1", "zero_stage"), ("dist.engin=ddp", "dist.engin"),
                             ("dist.engine=fsdp1", "dist.engine"),
                             ("train.grad_accum=0", "grad_accum")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            small_cfg(shards, tmp_path, override)


def test_resume_refuses_another_number_of_processes(shards, tmp_path):
    from selfflow.training.loop import build_trainer, restore, train

    cfg = small_cfg(shards, tmp_path, "train.max_steps=1")
    train(cfg, progress=False)
    tr = build_trainer(cfg, "cpu")
    tr.dist = Dist(rank=0, world=2)  # as if launched with 2 processes; no collective runs before the check
    with pytest.raises(ConfigError, match="1 process.* this run has 2"):
        restore(tr, ckpt_io.latest_checkpoint(tmp_path / "checkpoints"))


# ---------------------------------------------------------------- two processes


def _main_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    cfg = [f"data.shards={shards}", f"run.dir={run_dir}", *SMALL, *extra]
    return ["training/main.py", "--config", "tiny", "--no-progress", *cfg]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_train_and_resume_exactly(shards, tmp_path, engine):
    """4 steps straight == 2 steps, then a resume from that checkpoint to 4: same per-step losses, same
    weights and EMA (bitwise), with each rank's RNG, optimizer shard and data position restored. The
    ZeRO-2 run starts under the deepspeed launcher and resumes under torchrun."""
    needs(engine)
    a, b = tmp_path / "a", tmp_path / "b"
    extra = (*ENGINES[engine], "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=0")
    launch(*_main_args(shards, a, *extra), launcher="deepspeed" if engine == "zero2" else "torchrun")
    ckpts = ckpt_io.list_checkpoints(a / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    assert {"rank_00000.pt", "rank_00001.pt", "rank_00001.json", "model.safetensors"} <= {
        p.name for p in ckpts[-1].iterdir()
    }
    positions = [json.loads(ckpt_io.rank_files(ckpts[-1], r)[1].read_text())["data"] for r in (0, 1)]
    assert all(p["batches"] == 4 for p in positions)
    shutil.copytree(a, b)  # then roll b back to step 2, as if the run had died after that checkpoint
    shutil.rmtree(b / "checkpoints" / "step_00000004")
    (b / "checkpoints" / "latest").write_text("step_00000002\n")
    launch(*_main_args(shards, b, *extra))
    rows = [read_metrics(d / "metrics.jsonl") for d in (a, b)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "loss_gen", "grad_norm"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    end = [ckpt_io.latest_checkpoint(d / "checkpoints") for d in (a, b)]
    for name in ("model", "ema", "head"):
        wa, wb = (ckpt_io.load_weights(c, name) for c in end)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    full = small_cfg(shards, a)  # the saved weights are whole (gathered under ZeRO-3), not shards
    from selfflow.configs.factory import build_model

    shapes = {k: v.shape for k, v in build_model(full, "cpu").state_dict().items()}
    assert {k: v.shape for k, v in ckpt_io.load_weights(end[0], "model").items()} == shapes


def _synthetic(tr, step: int, n: int, poison: bool = False):
    from selfflow.training.loop import make_batch

    pixels = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(100 + step)) * 2 - 1
    if poison:
        pixels[0, 0, 5, 5] = float("nan")
    return make_batch(tr, {"image": pixels}, [f"pattern number {i}" for i in range(n)])


def _single_reference(shards: Path, tmp_path: Path, steps: int) -> dict[str, torch.Tensor]:
    from selfflow.training.loop import build_trainer, train_step

    tr = build_trainer(small_cfg(shards, tmp_path), "cpu")
    for step in range(steps):
        train_step(tr, _synthetic(tr, step, 2))
    return {k: v.clone() for k, v in tr.ema.weights().items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_two_ranks_give_the_single_process_gradients_and_ema(shards, tmp_path, engine):
    """2 ranks (DistributedDataParallel, FSDP2 or ZeRO-3), each with the same 2 samples and noise draws (a
    global batch of two copies), average to exactly the single-process gradient of those 2 samples;
    after 3 steps the EMA (sharded under FSDP2, updated module by module from gathered parameters under
    ZeRO-3) equals the single-process EMA."""
    needs(engine)
    launch(__file__, "ema", str(tmp_path), str(shards), *ENGINES[engine])
    wrapper = {"ddp": "DistributedDataParallel", "fsdp": "FSDPMMDiT", "zero3": "DeepSpeedEngine"}[engine]
    assert {(tmp_path / f"wrapper_rank{r}.txt").read_text() for r in (0, 1)} == {wrapper}
    sharded, other = (ckpt_io.load_weights(tmp_path, f"ema_rank{r}") for r in (0, 1))
    assert sharded.keys() == other.keys() and all(torch.equal(sharded[k], other[k]) for k in other)
    reference = _single_reference(shards, tmp_path / "single", steps=3)
    assert sharded.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(sharded[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_a_nan_on_one_rank_is_skipped_by_every_rank(shards, tmp_path, engine):
    needs(engine)
    launch(__file__, "nan", str(tmp_path), str(shards), *ENGINES[engine])
    results = [json.loads((tmp_path / f"nan_rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["poisoned_loss_finite"] is (r["rank"] == 0)  # only rank 1 saw the NaN ...
        assert r["unchanged_after_nan"] and r["ema_unchanged_after_nan"]  # ... and no rank updated
        assert r["counters"] == [1, 1] and r["changed_after_recovery"]
        assert r["stop_agreed"] == [None, "SIGUSR1" if r["rank"] == 1 else "signal on another rank"]


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The worker process of `rank` among the launcher's children (by its RANK environment variable)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_sigterm_to_one_rank_saves_and_stops_every_rank(shards, tmp_path):
    """SIGTERM reaches rank 1 only: at the next step boundary both ranks agree, write one checkpoint
    together and exit 0."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_main_args(shards, run, "train.max_steps=100000", "train.ckpt_every=100000")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and read_metrics(run / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    stopped = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "preempted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "signal on another rank"  # rank 0 logs
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{stopped[0]['step']:08d}"
    assert all(p.is_file() for r in (0, 1) for p in ckpt_io.rank_files(ckpt, r))


@pytest.mark.slow
def test_every_rank_stops_when_the_run_dir_is_in_use(shards, tmp_path, hold_run_lock):
    """Rank 0 cannot lock run.dir: both ranks exit 2 (none waits in a collective for the other)."""
    run = tmp_path / "run"
    holder = hold_run_lock(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_main_args(shards, run, "train.max_steps=2")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert f"error: run.dir {run} is in use by pid {holder.pid}" in out, out[-3000:]
    assert "error: run.dir" in out and "rank 0 could not lock it" in out, out[-3000:]
    assert "exitcode  : 2" in out and "exitcode  : 1" not in out, out[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no metrics, config or checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_a_collective_waits_at_most_dist_timeout_s(shards, tmp_path, engine):
    """Rank 1 stalls outside a barrier (up to a minute, until rank 0 reports): rank 0's barrier fails
    after dist.timeout_s instead of waiting for it (the group torch or deepspeed initialises)."""
    needs(engine)
    launch(__file__, "timeout", str(tmp_path), str(shards), "dist.timeout_s=2", *ENGINES[engine])
    result = json.loads((tmp_path / "timeout.json").read_text())
    assert result["error"] is not None and 2 <= result["waited"] < result["stall"] / 2, result
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        small_cfg(shards, tmp_path, "dist.timeout_s=0")


# ---------------------------------------------------------------- worker side (run under torchrun)


def _snapshot(tr) -> dict[str, torch.Tensor]:
    from selfflow.training.distributed import full_parameters
    from selfflow.training.fsdp import full_tensor

    with full_parameters(tr.engine, tr.models.student):
        return {k: full_tensor(v).to("cpu", copy=True) for k, v in tr.models.student.state_dict().items()}


def _full_ema(tr) -> dict[str, torch.Tensor]:
    from selfflow.training.fsdp import full_tensor

    return {k: full_tensor(v).to("cpu", copy=True) for k, v in tr.ema.weights().items()}


def _worker_ema(tr, out: Path) -> None:
    from safetensors.torch import save_file

    from selfflow.training.loop import train_step

    tr.generator.manual_seed(tr.cfg.seed + 1)  # the same noise on both ranks: the global batch is 2 copies
    for step in range(3):
        train_step(tr, _synthetic(tr, step, 2))
    save_file(_full_ema(tr), out / f"ema_rank{tr.dist.rank}.safetensors")
    wrapper = next(w for w in (tr.ddp, tr.engine, tr.models.student) if w is not None)
    (out / f"wrapper_rank{tr.dist.rank}.txt").write_text(type(wrapper).__name__)


def _worker_nan(tr, out: Path) -> None:
    from selfflow.training.guards import Preemption
    from selfflow.training.loop import _stop_signal, train_step

    train_step(tr, _synthetic(tr, 0, 2))
    before, ema_before = _snapshot(tr), _full_ema(tr)
    bad = train_step(tr, _synthetic(tr, 1, 2, poison=tr.dist.rank == 1))
    result = {"rank": tr.dist.rank, "poisoned_loss_finite": bool(torch.isfinite(bad.loss).all())}
    after = _snapshot(tr)
    result["unchanged_after_nan"] = all(torch.equal(before[k], after[k]) for k in before)
    ema_after = _full_ema(tr)
    result["ema_unchanged_after_nan"] = all(torch.equal(v, ema_after[k]) for k, v in ema_before.items())
    result["counters"] = [tr.nonfinite, tr.nonfinite_streak]
    train_step(tr, _synthetic(tr, 2, 2))
    result["changed_after_recovery"] = any(not torch.equal(before[k], v) for k, v in _snapshot(tr).items())
    stop = Preemption([])
    first = _stop_signal(tr, stop)
    stop.requested = "SIGUSR1" if tr.dist.rank == 1 else None  # a signal that reached rank 1 only
    result["stop_agreed"] = [first, _stop_signal(tr, stop)]
    (out / f"nan_rank{tr.dist.rank}.json").write_text(json.dumps(result))


def _worker_timeout(out: Path, stall: float = 60.0) -> None:
    if int(os.environ["RANK"]) == 1:  # stalls until rank 0 has reported (at most `stall` seconds)
        end = time.monotonic() + stall
        while not (out / "timeout.json").exists() and time.monotonic() < end:
            time.sleep(0.1)
        return
    start, error = time.monotonic(), None
    try:
        torch.distributed.barrier()
    except RuntimeError as e:
        error = str(e).splitlines()[0]
    result = {"waited": time.monotonic() - start, "stall": stall, "error": error}
    (out / "timeout.json").write_text(json.dumps(result))


def worker(mode: str, out: str, shards: str, *overrides: str) -> None:
    from selfflow.inference.pipeline import pick_device
    from selfflow.training import distributed as dist_io
    from selfflow.training.loop import build_trainer

    cfg = small_cfg(shards, Path(out) / "run", *overrides)
    dist, device = dist_io.init_dist(cfg, pick_device("cpu"))
    if mode == "timeout":
        return _worker_timeout(Path(out))  # the group is left to exit: it saw a failed collective
    try:
        tr = build_trainer(cfg, device, dist)
        {"ema": _worker_ema, "nan": _worker_nan}[mode](tr, Path(out))
        dist_io.barrier(dist)  # as train() does: nobody leaves while the other still talks
    finally:
        dist_io.shutdown(dist)


if __name__ == "__main__":
    worker(*sys.argv[1:])
