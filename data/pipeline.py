"""The training data pipeline: one stream per task from its shard set, mixed by weight, one task per
batch, deterministic, fault-tolerant, and resumable to the exact next sample.

    pipe = DataPipeline("shards/", spec, seed=0, weights={"image": 1, "av": 3}, batch_sizes={"av": 8})
    batch = next(pipe)           # MediaBatch(task="av", media={"video": [8,3,T,H,W], "audio": [8,1,N]}, ...)
    state = pipe.state_dict()    # JSON-able; DataPipeline(...).load_state_dict(state) continues exactly

Tasks and fields (the shard sets `tools/make_shards.py` writes): `image` (png / jpg / webp),
`video` (mp4), `audio` (flac / wav), `av` (mp4 with an audio track); every sample has `txt`. Media come
out as float32 in [-1, 1]: image [C, H, W], video [C, T, H, W], audio [C, N], shaped by the clip spec
(`data/avio.py` aligns video and audio on the container clock; a clip is the first `spec.duration`
seconds of the sample, which make_shards cuts to length).

Order. Each epoch of a task permutes its shard list with RNG (seed, epoch), the same on every rank,
and gives process (rank, worker) every (world x workers)-th shard of it, so processes read disjoint
shards; samples then pass a shuffle buffer seeded by (seed, rank, worker, epoch, task). Which task a
batch comes from is drawn from RNG (seed, worker, batch index), the same on every rank. The state is
the batch index plus, per task, (epoch, raw samples consumed in the epoch): restoring replays the raw
tar stream up to that point without decoding, so the next batch is the one an uninterrupted run would
have produced.

Faults (`data/streams.py`). A bad sample or shard is skipped and counted with its key and shard, and
listed in the next batch's `MediaBatch.skipped`; `strict=True` raises instead. More processes than
shards is an error at start.

Shard set. The state carries a fingerprint of each task's shard list (paths and sizes); resuming into
another list is a DataError unless `allow_changed_shards` (the saved positions then index a new order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow.data.decode import FITS
from selfflow.data.fields import TASK_MODALITIES, infer_task
from selfflow.data.shards import iter_tar_samples
from selfflow.data.sources import ShardSource, find_shards
from selfflow.data.streams import CLIP_WINDOWS, DataError, TaskStream
from selfflow.tokenizers.spec import MODALITIES, ClipSpec


@dataclass
class MediaBatch:
    task: str  # the task of every sample, or "packed"
    media: dict[str, Tensor]  # image [B, C, H, W], video [B, C, T, H, W], audio [B, C, N]; float32 in [-1, 1]
    captions: list[str]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("shard:key", reason) met on the way
    # packed: each sample's task, in order; media[m] stacks, in sample order, the samples that have m
    tasks: tuple[str, ...] = ()
    latents: frozenset[str] = frozenset()  # modalities whose media[m] are stored codec latents, not media


def available_tasks(
    shards: ShardSource, task_shards: dict[str, str] | None = None, peek: int = 64
) -> list[str]:
    """Tasks found in `shards`: those of typed shard sets, and, for mixed sources, those of the first
    `peek` samples of their first readable shard (a task that first appears later needs data.weights)."""
    sets = find_shards(shards, task_shards)
    found = set(sets.typed)
    for shard in sets.mixed[:4]:
        try:
            for _, raw in zip(range(peek), iter_tar_samples(shard), strict=False):
                with contextlib.suppress(ValueError):
                    found.add(infer_task(raw))
        except (tarfile.TarError, OSError):
            continue
        if found - set(sets.typed):
            break
    return [t for t in TASK_MODALITIES if t in found]


def shard_fingerprint(paths: list[str]) -> str:
    """Changes when a shard is added, removed, reordered, renamed or changes size."""
    listing = [(p, os.path.getsize(p) if os.path.isfile(p) else None) for p in paths]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def check_fingerprints(saved: dict[str, str] | None, current: dict[str, str], allow: bool) -> None:
    """DataError when a task's shard list differs from the one a saved position was taken in (states
    written before fingerprints existed pass)."""
    changed = [t for t in current if saved is not None and saved.get(t, current[t]) != current[t]]
    if changed and not allow:
        raise DataError(
            f"the shard list of task(s) {', '.join(changed)} differs from the checkpoint's: the saved "
            "data position would index another stream (set data.allow_changed_shards=true to resume anyway)"
        )


class DataPipeline:
    """Per-task streams mixed by weight; each batch holds one task with that task's batch size.
    `shards` names sources, comma-separated (`data/sources.py`): a task reads its typed shards and every
    mixed shard, where it takes the samples whose fields make them its own. `options` are TaskStream's
    (shuffle_buffer, strict, image_fit, limits, caption_key, clip_window, open_retries, retry_wait_s,
    latents: the modalities read from stored codec latents)."""

    def __init__(
        self,
        shards: str | Path,
        spec: ClipSpec,
        seed: int = 0,
        weights: dict[str, float] | None = None,
        batch_sizes: dict[str, int] | None = None,
        batch_size: int = 32,
        *,
        rank: int = 0,
        world: int = 1,
        worker: int = 0,
        workers: int = 1,
        task_shards: dict[str, str] | None = None,
        allow_changed_shards: bool = False,
        tokens_per_batch: int = 0,
        text_tokens: int = 0,
        **options: Any,
    ) -> None:
        if options.get("image_fit", "crop") not in FITS:
            raise ValueError(f"image_fit must be one of {', '.join(FITS)}, got {options['image_fit']!r}")
        if options.get("clip_window", "random") not in CLIP_WINDOWS:
            raise ValueError(f"clip_window must be one of {', '.join(CLIP_WINDOWS)}")
        sets = find_shards(shards, task_shards)
        if not weights:
            weights = {t: 1.0 for t in available_tasks(shards, task_shards)}
        missing = [t for t in weights if t not in sets.typed] if not sets.mixed else []
        if missing or not weights:
            raise FileNotFoundError(
                f"no shard set for task(s) {missing or list(TASK_MODALITIES)} in {shards}"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise DataError(f"data.weights must be >= 0 with a positive sum, got {weights}")
        self.tasks = [t for t in TASK_MODALITIES if weights.get(t, 0) > 0]
        self.probs = np.array([weights[t] for t in self.tasks], np.float64) / sum(
            weights[t] for t in self.tasks
        )
        self.batch_sizes = {t: int((batch_sizes or {}).get(t, batch_size)) for t in self.tasks}
        # packing (tokens_per_batch > 0): what one sample of each task costs of the budget
        self.tokens_per_batch = tokens_per_batch
        self.sample_tokens = {
            t: sum(spec.tokens(m) for m in TASK_MODALITIES[t]) + text_tokens for t in self.tasks
        }
        if tokens_per_batch and max(self.sample_tokens.values()) > tokens_per_batch:
            raise DataError(
                f"data.tokens_per_batch={tokens_per_batch} is below one sample: {self.sample_tokens}"
            )
        self.seed, self.rank, self.worker, self.batches = seed, rank, worker, 0
        self.latents = frozenset(options.get("latents", ()))
        self.allow_changed_shards = allow_changed_shards
        proc = {"rank": rank, "world": world, "worker": worker, "workers": workers}
        lists = {t: sets.typed.get(t, []) + sets.mixed for t in self.tasks}
        self.fingerprints = {t: shard_fingerprint(paths) for t, paths in lists.items()}
        mixed = frozenset(sets.mixed)
        self.streams = {  # the first stream counts the faults of the mixed shards they all read
            t: TaskStream(t, paths, spec, seed, mixed=mixed, accounting=t == self.tasks[0], **proc, **options)
            for t, paths in lists.items()
        }

    def __iter__(self) -> DataPipeline:
        return self

    def next_task(self) -> str:
        """The task of the next batch: the same on every rank (a sharded engine needs every rank to run
        the same modules in a step); the 0 keeps the sequence a single process drew before."""
        rng = np.random.default_rng([self.seed, 0, self.worker, self.batches])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]

    def packed_tasks(self) -> list[str]:
        """The tasks of the next packed batch, in order: drawn one sample at a time by weight from RNG
        (seed, 1, worker, batch index), the same on every rank, until the next draw would not fit."""
        rng = np.random.default_rng([self.seed, 1, self.worker, self.batches])
        chosen, used = [], 0
        while True:
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]
            if chosen and used + self.sample_tokens[task] > self.tokens_per_batch:
                return chosen
            chosen.append(task)
            used += self.sample_tokens[task]

    def __next__(self) -> MediaBatch:
        tasks = self.packed_tasks() if self.tokens_per_batch else None
        if tasks is None:
            task = self.next_task()
            tasks = [task] * self.batch_sizes[task]
        samples = [next(self.streams[task]) for task in tasks]
        self.batches += 1
        media = _stack(samples, tasks)
        skipped = [fault for s in self.streams.values() for fault in s.recent]
        for s in self.streams.values():
            s.recent = []
        captions, keys = [s.caption for s in samples], [s.key for s in samples]
        if self.tokens_per_batch:
            return MediaBatch("packed", media, captions, keys, skipped, tuple(tasks), self.latents)
        return MediaBatch(tasks[0], media, captions, keys, skipped, latents=self.latents)

    @property
    def skipped_count(self) -> int:
        return sum(s.skipped_count for s in self.streams.values())

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: batches drawn, each stream's (epoch, raw position), the shard lists' prints."""
        streams = {t: s.state_dict() for t, s in self.streams.items()}
        state = {"batches": self.batches, "streams": streams, "shards": dict(self.fingerprints)}
        return state | {"tokens_per_batch": self.tokens_per_batch, "sample_tokens": dict(self.sample_tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self.streams):
            raise DataError(
                f"data state has tasks {sorted(state['streams'])}, the pipeline {sorted(self.streams)}"
            )
        check_fingerprints(state.get("shards"), self.fingerprints, self.allow_changed_shards)
        packing = (state.get("tokens_per_batch", 0), state.get("sample_tokens", self.sample_tokens))
        if packing != (self.tokens_per_batch, self.sample_tokens) and not self.allow_changed_shards:
            raise DataError(
                f"the data state packs {packing[0]} tokens per batch (samples of {packing[1]} tokens), this "
                f"run {self.tokens_per_batch} ({self.sample_tokens}): the task sequence would differ (set "
                "data.allow_changed_shards=true to resume anyway)"
            )
        self.batches = int(state["batches"])
        for t, s in state["streams"].items():
            self.streams[t].load_state_dict(s)


def _stack(samples: list[Any], tasks: list[str]) -> dict[str, Tensor]:
    """{modality: [n_m, ...]}: each modality's arrays of the samples that have it, in sample order."""
    media = {}
    for m in MODALITIES:
        arrays = [s.media[m] for s, t in zip(samples, tasks, strict=True) if m in TASK_MODALITIES[t]]
        if arrays:
            media[m] = torch.from_numpy(np.stack(arrays))
    return media


def next_epoch_state(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """A data position for a job with another number of processes than the one that saved `saved` (one
    state per old rank, of a DataPipeline or a WorkerPipeline): the shard split changes with the count,
    so no old position carries over; every task starts the epoch after the newest one any old rank was
    in, and the batch counters (hence the task sequence) continue."""
    if "workers" in saved[0]:
        workers = int(saved[0]["workers"])
        per_worker = [[s["states"][w] for s in saved if s["states"][w] is not None] for w in range(workers)]
        states = [_next_epoch(ws) if ws else None for ws in per_worker]
        return {**saved[0], "states": states}
    return _next_epoch(saved)


def _next_epoch(saved: list[dict[str, Any]]) -> dict[str, Any]:
    streams = {}
    for task in saved[0]["streams"]:
        old = [s["streams"][task] for s in saved]
        epoch = max(int(o["epoch"]) for o in old) + 1
        streams[task] = {"epoch": epoch, "position": 0, "skipped_count": sum(o["skipped_count"] for o in old)}
    return {**saved[0], "streams": streams}


class _WorkerStream(torch.utils.data.IterableDataset):
    """Inside DataLoader worker i: the DataPipeline of logical worker (first + i) % workers, yielding
    (batch, its state after the batch). Media travel as numpy arrays, pickled through the worker's pipe:
    a tensor would be shared by passing a file descriptor over a socket the worker serves, and a worker
    that stalls then hangs the main process for ever, past the DataLoader's timeout."""

    def __init__(self, kwargs: dict[str, Any], workers: int, first: int, states: list | None) -> None:
        super().__init__()
        self.kwargs, self.workers, self.first, self.states = kwargs, workers, first, states

    def __iter__(self) -> Iterator[tuple[MediaBatch, dict]]:
        info = torch.utils.data.get_worker_info()
        logical = (self.first + (info.id if info is not None else 0)) % self.workers
        pipe = DataPipeline(**self.kwargs, worker=logical, workers=self.workers)
        if self.states is not None and self.states[logical] is not None:
            pipe.load_state_dict(self.states[logical])
        for batch in pipe:
            batch.media = {m: x.numpy() for m, x in batch.media.items()}
            yield batch, pipe.state_dict()


def _as_is(item: Any) -> Any:
    return item


class WorkerPipeline:
    """DataPipeline split over `workers` DataLoader processes (each reads its own shards), in a fixed
    round-robin order, with a state that restores the exact next batch (worker w's own state plus
    which worker is next).

        pipe = WorkerPipeline(dict(shards="shards/", spec=spec, seed=0), workers=2)
    """

    def __init__(self, kwargs: dict[str, Any], workers: int, timeout: float = 600.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.kwargs, self.workers, self.timeout = kwargs, workers, timeout
        self.latents = frozenset(kwargs.get("latents", ()))
        probe = DataPipeline(**kwargs, worker=workers - 1, workers=workers)  # fail now on too few shards
        self.fingerprints = probe.fingerprints
        if not kwargs.get("weights"):  # the tasks are found once, here, and not again in each worker
            self.kwargs = {**kwargs, "weights": {t: 1.0 for t in probe.tasks}}
        self.states: list[dict | None] = [None] * workers
        self.count = 0  # batches delivered
        self._loader: Iterator | None = None
        self.skipped_count = 0

    def _start(self) -> Iterator:
        first = self.count % self.workers
        dataset = _WorkerStream(self.kwargs, self.workers, first, self.states)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=2,
            timeout=self.timeout,
            collate_fn=_as_is,
        )
        loader_iter = iter(loader)  # torch installs its SIGCHLD handler here
        _CHILD_WATCH.install()
        return loader_iter

    def __iter__(self) -> WorkerPipeline:
        return self

    def __next__(self) -> MediaBatch:
        if self._loader is None:
            self._loader = self._start()
        try:
            with _CHILD_WATCH:
                batch, state = next(self._loader)
        except DataError as err:  # raised in a worker: the DataLoader adds the worker's traceback
            raise DataError(_last_line(err)) from err
        except RuntimeError as err:  # a worker died (killed, crashed) or sent nothing for `timeout` s
            if not any(m in str(err) for m in _LOADER_FAULTS):
                raise  # an error in the worker's own code: a bug, with its traceback
            why = f"data loader: {_last_line(err)} (data.worker_timeout_s={self.timeout:g})"
            raise DataError(why) from err
        batch.media = {m: torch.from_numpy(x) for m, x in batch.media.items()}
        self.states[self.count % self.workers] = state
        self.count += 1
        self.skipped_count = sum(
            t["skipped_count"] for st in self.states if st is not None for t in st["streams"].values()
        )
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "count": self.count, "states": list(self.states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["workers"]) != self.workers:
            raise DataError(f"data state is for {state['workers']} workers, this run has {self.workers}")
        allow = bool(self.kwargs.get("allow_changed_shards", False))
        for worker_state in state["states"]:
            if worker_state is not None:
                check_fingerprints(worker_state.get("shards"), self.fingerprints, allow)
        self.count, self.states, self._loader = int(state["count"]), list(state["states"]), None


class _ChildWatch:
    """torch's DataLoader reports a dead worker from a SIGCHLD handler, which raises its RuntimeError
    wherever the main thread happens to be (in the middle of a forward pass, in a checkpoint write).
    This wraps that handler: the check runs at once inside `with _CHILD_WATCH:` (around next()) and is
    put off to the next entry elsewhere, so a dead worker always surfaces from next() as a DataError."""

    def __init__(self) -> None:
        self.inside, self.pending = 0, False
        self.torch_handler: Any = None

    def install(self) -> None:
        if self.torch_handler is not None or threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGCHLD)
        if callable(handler):
            self.torch_handler = handler
            signal.signal(signal.SIGCHLD, self._on_child)

    def _on_child(self, signum: int, frame: Any) -> None:
        if self.inside:
            self.torch_handler(signum, frame)
        else:
            self.pending = True

    def __enter__(self) -> None:
        self.inside += 1
        if self.pending:
            self.pending = False
            try:
                self.torch_handler(signal.SIGCHLD, None)
            except BaseException:
                self.inside -= 1  # __exit__ does not run when __enter__ raises
                raise

    def __exit__(self, *exc: object) -> None:
        self.inside -= 1


_CHILD_WATCH = _ChildWatch()

# what torch's DataLoader says when a worker dies or sends nothing for its timeout
_LOADER_FAULTS = ("DataLoader worker", "DataLoader timed out")


def _last_line(err: BaseException) -> str:
    """The message of an error re-raised from a DataLoader worker is its traceback: keep the last line,
    without the exception's module path."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1] if lines else type(err).__name__)
