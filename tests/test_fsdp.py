"""FSDP2 (dist.engine=fsdp) on the CPU with gloo: resuming on another number of processes, the per-rank
memory of the sharded state, a mixed-task run; and gradient accumulation and torch.compile in one
process. This file doubles as the worker script (`torchrun ... tests/test_fsdp.py <mode> <out> <shards>
[overrides]`); the 2-process launcher and the small model come from test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flac
from test_distributed import ROOT, _main_args, _synthetic, launch, small_cfg

from selfflow.data.shards import ShardWriter
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.tracking import read_metrics

FSDP = ("dist.engine=fsdp",)


def run_main(nproc: int, shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """training/main.py under torchrun with `nproc` processes, or as a plain `python` process (0)."""
    args = _main_args(shards, run_dir, *FSDP, *extra)
    if nproc == 2:
        return launch(*args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, *args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def run_worker(nproc: int, mode: str, out: Path, shards: Path, *extra: str) -> dict:
    """This file's worker under torchrun with `nproc` processes; rank 0's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    args = [__file__, mode, str(out), str(shards), *FSDP, *extra]
    if nproc == 2:
        launch(*args)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((out / f"{mode}.json").read_text())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (2, 0), (1, 2)])  # 0: plain `python`, a group of one
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(shards, tmp_path, first, then):
    """A checkpoint of `first` processes loads into `then` processes with the same student, head, EMA and
    optimizer state (gathered whole and compared bitwise), and training goes on from it, under torchrun
    or as a plain `python training/main.py`."""
    run = tmp_path / "run"
    extra = ("train.max_steps=2", "train.ckpt_every=2", "train.keep_last=0")
    run_main(first, shards, run, *extra)
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    assert (ckpt / "dcp" / ".metadata").is_file() and json.loads((ckpt / "state.json").read_text())[
        "world"
    ] == first
    loaded = {n: run_worker(n, "reshard", tmp_path / f"load{n}", shards, f"run.dir={run}") for n in (1, 2)}
    for n in (1, 2):  # whole weights gathered after loading == the safetensors the checkpoint exported
        for name in ("model", "ema", "head"):
            got = ckpt_io.load_weights(tmp_path / f"load{n}", f"{name}_full")
            assert _equal(got, ckpt_io.load_weights(ckpt, name)), (n, name)
    optim = [ckpt_io.load_weights(tmp_path / f"load{n}", "optimizer_full") for n in (1, 2)]
    assert optim[0] and _equal(optim[0], optim[1])  # Adam moments, resharded either way
    assert loaded[1]["step"] == loaded[2]["step"] == 2
    run_main(then, shards, run, "train.max_steps=3", "train.ckpt_every=1", "train.keep_last=0")
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert {"event": "resharded", "from_processes": first, "to_processes": max(then, 1)} in [
        {k: r[k] for k in ("event", "from_processes", "to_processes") if k in r} for r in rows if "event" in r
    ]
    state = json.loads((ckpt_io.latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert state["world"] == max(then, 1)
    tuned = tmp_path / "tuned"  # and a sharded run can start from its weights (train.init_from)
    run_main(then, shards, tuned, f"train.init_from={ckpt}", "train.lr=1e-9", "train.max_steps=1")
    before = ckpt_io.load_weights(ckpt, "model")
    after = ckpt_io.load_weights(ckpt_io.latest_checkpoint(tuned / "checkpoints"), "model")
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)  # lr 1e-9: barely moved
    assert read_metrics(tuned / "metrics.jsonl")[0]["event"] == "init_from"


@pytest.mark.slow
def test_fsdp_halves_the_per_rank_state(shards, tmp_path):
    """Weights + EMA + optimizer state held by one rank (local shards, summed from the tensors) after one
    step: about half with 2 processes of what 1 process holds."""
    one = run_worker(1, "memory", tmp_path / "one", shards)
    two = run_worker(2, "memory", tmp_path / "two", shards)
    assert one["world"] == 1 and two["world"] == 2 and one["optimizer_tensors"] > 0
    ratio = two["bytes"] / one["bytes"]
    assert 0.45 < ratio < 0.56, (one, two)


@pytest.fixture(scope="module")
def mixed(shards, tmp_path_factory) -> Path:
    """The image shards plus 2 audio shards (every rank needs one of each task)."""
    root = tmp_path_factory.mktemp("fsdp_mixed")
    for tar in shards.glob("*.tar"):
        (root / tar.name).write_bytes(tar.read_bytes())
    with ShardWriter(root, "audio", max_samples=3) as w:
        for i in range(6):
            w.write({"__key__": f"audio_{i:03d}", "flac": flac(i), "txt": f"a tone {i}"})
    return root


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_a_mixed_task_run_with_accumulation_completes_on_two_ranks(mixed, tmp_path, engine):
    """Image and audio batches in one run, two micro-batches per step (gradients reduced on the second
    only) and activation checkpointing: every rank runs each micro-batch's task, so the collectives
    match, and both tasks train."""
    run = tmp_path / "run"
    extra = ("train.max_steps=6", "train.grad_accum=2", "data.weights={image: 1, audio: 1}", "sample.every=0",
             "model.grad_checkpointing=true")  # fmt: skip
    args = _main_args(mixed, run, f"dist.engine={engine}", *extra)
    launch(*args)
    last = [r for r in read_metrics(run / "metrics.jsonl") if "samples_seen_audio" in r][-1]
    assert last["step"] == 6 and last["samples_seen"] == 6 * 2 * 2  # steps x micro-batches x batch size
    assert last["samples_seen_image"] > 0 and last["samples_seen_audio"] > 0


def test_the_bf16_policy_leaves_the_units_inputs_in_their_dtype():
    """On CUDA units compute in bf16 and reduce in fp32, but the levels t, the fp32 residual stream and
    the rotary tables reach each block unrounded (autocast, not FSDP, casts the matmuls)."""
    from selfflow.training.fsdp import mixed_precision

    policy = mixed_precision(torch.device("cuda"), "auto")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy.cast_forward_inputs is False
    assert mixed_precision(torch.device("cpu"), "auto").param_dtype is None


# ---------------------------------------------------------------- worker side (run under torchrun)


def _worker_reshard(tr, out: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from selfflow.training.distributed import ObjectiveModule
    from selfflow.training.fsdp import full_weights
    from selfflow.training.saving import restore

    restore(tr, ckpt_io.latest_checkpoint(Path(tr.cfg.run.dir) / "checkpoints"))
    weights = full_weights(tr)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    both = ObjectiveModule(tr.models.student, tr.models.head)
    optim = get_optimizer_state_dict(both, tr.optimizer, options=options)
    if tr.dist.is_main:
        for name, tensors in weights.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{name}_full.safetensors")
        moments = {f"{p}.{k}": v for p, st in optim["state"].items() for k, v in st.items() if v.dim() > 0}
        save_file({k: v.contiguous() for k, v in moments.items()}, out / "optimizer_full.safetensors")
        (out / "reshard.json").write_text(json.dumps({"step": tr.step}))


def _worker_memory(tr, out: Path) -> None:
    from selfflow.training.fsdp import local_bytes
    from selfflow.training.step import train_step

    train_step(tr, _synthetic(tr, 0, 2))
    tensors = sum(len(s) for s in tr.optimizer.state.values())
    if tr.dist.is_main:
        result = {"world": tr.dist.world, "bytes": local_bytes(tr), "optimizer_tensors": tensors}
        (out / "memory.json").write_text(json.dumps(result))


def worker(mode: str, out: str, shards: str, *overrides: str) -> None:
    from selfflow.inference.pipeline import pick_device
    from selfflow.training import distributed as dist_io
    from selfflow.training.loop import build_trainer

    cfg = small_cfg(shards, Path(out) / "run", *overrides)  # a run.dir among the overrides wins
    dist, device = dist_io.init_dist(cfg, pick_device("cpu"))
    try:
        tr = build_trainer(cfg, device, dist)
        {"reshard": _worker_reshard, "memory": _worker_memory}[mode](tr, Path(out))
        dist_io.barrier(dist)
    finally:
        dist_io.shutdown(dist)


if __name__ == "__main__":
    worker(*sys.argv[1:])
