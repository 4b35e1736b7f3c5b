"""Resumable shard sets: a progress log, a per-task writer that keeps finished shards, and verification.

make_shards writes the samples of each task in one fixed order (inputs sorted by key), and a shard
closes on a rule that depends only on the samples in it (`ShardLimits`). So sample positions and
shard boundaries are the same on every run with the same inputs and options, and a resumed run can
skip what is already on disk:

- `Progress` appends to `<output>/progress.jsonl` what became of every input (its task and sample
  keys, or why it was rejected) and, once a shard is renamed into place, its size and sha256. The
  first line fingerprints the inputs and options; a log with another fingerprint is discarded.
- `TaskShards` replays a task's samples by position: samples that fall in a recorded shard whose file
  still has the recorded sha256 are dropped (that shard is not rewritten), any other recorded shard is
  rebuilt with its recorded boundaries, and new shards close by the limits.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

from selfflow.data.prepare import TASK_FIELDS, TASKS, Outcome, Prepared
from selfflow.data.shards import (
    TEMP_SUFFIX,
    ShardFile,
    ShardInfo,
    ShardLimits,
    iter_tar_samples,
    sha256_file,
    shard_path,
)

PROGRESS, MANIFEST = "progress.jsonl", "manifest.json"


class Progress:
    """The append-only log of one output folder (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.path = folder / PROGRESS
        self.outcomes: dict[str, Outcome] = {}
        self.shards: dict[str, dict[int, ShardInfo]] = {}
        records = self._load(fingerprint)
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as f:  # drop a torn last line or a stale log
            f.writelines(json.dumps(r) + "\n" for r in [{"fingerprint": fingerprint}, *records])
        os.replace(temp, self.path)
        self._log: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _load(self, fingerprint: str) -> list[dict]:
        """The valid records of a log with this fingerprint, up to the first unreadable line."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            records.append(record)
        if not records or records[0] != {"fingerprint": fingerprint}:
            return []
        try:
            for record in records[1:]:
                self._replay(record)
        except (KeyError, TypeError, ValueError):  # not a log this code wrote: start over
            self.outcomes, self.shards = {}, {}
            return []
        return records[1:]

    def _replay(self, record: dict) -> None:
        if "shard" in record:
            info = ShardInfo(record["file"], record["samples"], record["bytes"], record["sha256"])
            self.shards.setdefault(record["shard"], {})[record["index"]] = info
            return
        samples = [Prepared(key, {}, stats) for key, stats in record.get("samples", [])]
        outcome = Outcome(record["entry"], record["path"], record.get("task"), samples, record.get("reason"))
        self.outcomes[outcome.key] = outcome

    def record_outcome(self, outcome: Outcome) -> None:
        record = {"entry": outcome.key, "path": outcome.path}
        if outcome.reason is not None:
            record["reason"] = outcome.reason
        else:
            record |= {"task": outcome.task, "samples": [[s.key, s.stats] for s in outcome.samples]}
        self._log.write(json.dumps(record) + "\n")

    def record_shard(self, task: str, index: int, info: ShardInfo) -> None:
        """Called once the shard is in place: everything logged so far reaches the disk first."""
        self._log.write(json.dumps({"shard": task, "index": index, **info.to_json()}) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        self._log.close()


def shard_matches(folder: Path, info: ShardInfo) -> bool:
    path = folder / info.file
    return path.is_file() and path.stat().st_size == info.bytes and sha256_file(path) == info.sha256


class TaskShards:
    """Writes one task's samples, given in position order, into `<task>-%06d.tar` (see module docstring)."""

    def __init__(
        self,
        folder: Path,
        task: str,
        limits: ShardLimits,
        recorded: dict[int, ShardInfo],
        on_finish: Callable[[str, int, ShardInfo], None],
    ) -> None:
        self.folder, self.task, self.limits, self.on_finish = folder, task, limits, on_finish
        self.recorded: list[ShardInfo] = []
        while len(self.recorded) in recorded:  # only a gap-free prefix has known positions
            self.recorded.append(recorded[len(self.recorded)])
        self.valid = [shard_matches(folder, info) for info in self.recorded]
        self.starts = [0]
        for info in self.recorded:
            self.starts.append(self.starts[-1] + info.samples)
        self.done: dict[int, ShardInfo] = {}
        self.index = self.position = 0
        self._shard: ShardFile | None = None

    @property
    def kept(self) -> int:
        return sum(self.valid)

    def covered(self, start: int, count: int) -> bool:
        """Whether positions start .. start + count - 1 all lie in kept shards."""
        for position in range(start, start + count):
            i = bisect.bisect_right(self.starts, position) - 1
            if i >= len(self.recorded) or not self.valid[i]:
                return False
        return True

    def skip(self, count: int) -> None:
        """Pass over `count` samples that lie in kept shards (see `covered`)."""
        for _ in range(count):
            self._advance_recorded()

    def add(self, sample: dict) -> None:
        if self.index < len(self.recorded):
            if not self.valid[self.index]:  # rebuild a recorded shard up to its recorded end
                self._open().add(sample)
            self._advance_recorded()
            return
        if self._shard is not None and self.limits.full(self._shard, sample):
            self._finish()
        self._open().add(sample)
        self.position += 1

    def _open(self) -> ShardFile:
        if self._shard is None:
            self._shard = ShardFile(shard_path(self.folder, self.task, self.index))
        return self._shard

    def _advance_recorded(self) -> None:
        self.position += 1
        if self.position == self.starts[self.index + 1]:
            if self._shard is not None:
                self._finish()
            else:
                self.done[self.index] = self.recorded[self.index]
                self.index += 1

    def _finish(self) -> None:
        info = self._shard.finish()
        self._shard = None
        self.done[self.index] = info
        self.on_finish(self.task, self.index, info)
        self.index += 1

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; every shard of the set, in order."""
        if self._shard is not None:
            self._finish()
        return [self.done[i] for i in range(self.index)]

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


# ---------------------------------------------------------------------- manifest helpers
def sample_stats(accepted: list[Outcome]) -> dict:
    """Manifest statistics per task: resolutions and sample rates (counts), durations (seconds)."""
    resolutions: dict[str, Counter] = {}
    rates: dict[str, Counter] = {}
    durations: dict[str, list[float]] = {}
    for outcome in accepted:
        for sample in outcome.samples:
            task, stats = outcome.task, sample.stats
            if "resolution" in stats:
                resolutions.setdefault(task, Counter())[stats["resolution"]] += 1
            if "sample_rate" in stats:
                rates.setdefault(task, Counter())[str(stats["sample_rate"])] += 1
            if "duration" in stats:
                durations.setdefault(task, []).append(float(stats["duration"]))
    return {
        "resolutions": {t: dict(sorted(c.items())) for t, c in resolutions.items()},
        "sample_rates": {t: dict(sorted(c.items())) for t, c in rates.items()},
        "durations": {
            t: {"total_s": round(sum(d), 3), "min_s": round(min(d), 3), "max_s": round(max(d), 3)}
            for t, d in durations.items()
        },
    }


def remove_stale(output: Path, keep: dict[str, list[ShardInfo]]) -> None:
    """Delete shards of any task that this run did not write (an earlier, larger run) and orphaned temps."""
    kept = {info.file for infos in keep.values() for info in infos}
    pattern = re.compile(r"(" + "|".join(TASKS) + r")-\d{6}\.tar(" + re.escape(TEMP_SUFFIX) + ")?")
    for path in output.iterdir():
        if pattern.fullmatch(path.name) and path.name not in kept:
            path.unlink()


# ---------------------------------------------------------------------- verification
def _problems_in(path: Path, task: str) -> tuple[int, list[str]]:
    """Samples in the shard, and what is wrong with them (no media field, no caption, repeated key)."""
    problems, keys = [], set()
    count = 0
    try:
        for sample in iter_tar_samples(path):
            count += 1
            key = sample["__key__"]
            if key in keys:
                problems.append(f"{path.name}: key {key} appears twice")
            keys.add(key)
            if not any(f in sample for f in TASK_FIELDS[task]):
                problems.append(f"{path.name}: {key}: no {task} field")
            if not sample.get("txt", b"").strip():
                problems.append(f"{path.name}: {key}: no caption")
    except (tarfile.TarError, OSError) as err:
        problems.append(f"{path.name}: unreadable ({err})")
    return count, problems


def verify(output: Path) -> list[str]:
    """Re-read every shard in the manifest: sha256, sample counts, fields. Empty when all is well."""
    path = output / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {output}; nothing to verify")
    manifest = json.loads(path.read_text())
    problems: list[str] = []
    for task, infos in manifest["shards"].items():
        total = 0
        for info in infos:
            shard = output / info["file"]
            if not shard.is_file():
                problems.append(f"{info['file']}: missing")
                continue
            if sha256_file(shard) != info["sha256"]:
                problems.append(f"{info['file']}: sha256 differs from the manifest")
            count, found = _problems_in(shard, task)
            problems += found
            if count != info["samples"]:
                problems.append(f"{info['file']}: {count} samples, manifest says {info['samples']}")
            total += count
        if total != manifest["counts"].get(task):
            problems.append(
                f"{task}: {total} samples in shards, manifest counts {manifest['counts'].get(task)}"
            )
    return problems
