"""make_shards' pass over its inputs: which entries to prepare (the resume log may already hold
them), preparing them in input order (a spawn pool for `--workers` > 1, whose dead or hung workers
become rejected inputs), and feeding each outcome to its task's shards.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from tqdm import tqdm

from selfflow.data.decode import LIMITS, DecodeLimits
from selfflow.data.inputs import Entry, Skip
from selfflow.data.latents import LatentOptions
from selfflow.data.prepare import Outcome, Prepared, Target, prepare
from selfflow.data.shardsets import Progress, TaskShards


@dataclass
class ShardRun:
    """One pass over the inputs: which to prepare, in what order, and where their samples go."""

    entries: list[Entry]
    target: Target
    progress: Progress
    sets: dict[str, TaskShards]
    latents: LatentOptions | None = None
    workers: int = 1
    quiet: bool = False
    limits: DecodeLimits = LIMITS
    timeout: float = 600.0  # seconds a pool worker may take for one input
    work: Callable[..., Outcome] = prepare  # entry -> Outcome (tests give one that dies)

    def plan(self) -> list[Outcome | None]:
        """Per entry, its logged outcome if nothing of it needs writing again, else None (prepare it)."""
        planned: list[Outcome | None] = []
        positions: Counter = Counter()
        for entry in self.entries:
            known = self.progress.outcomes.get(entry.key)
            if known is None:  # the log holds a prefix of the inputs: the rest is prepared again
                return planned + [None] * (len(self.entries) - len(planned))
            if known.reason is None:
                covered = self.sets[known.task].covered(positions[known.task], len(known.samples))
                positions[known.task] += len(known.samples)
                known = known if covered else None
            planned.append(known)
        return planned

    def outcomes(self, planned: list[Outcome | None]) -> Iterator[tuple[Outcome, bool]]:
        """(outcome, fresh) in input order: planned ones as they are, the others prepared now."""
        todo = [e for e, p in zip(self.entries, planned, strict=True) if p is None]
        work = partial(self.work, target=self.target, latents=self.latents, limits=self.limits)
        if self.workers > 1 and len(todo) > 1:
            fresh = pooled(work, todo, min(self.workers, len(todo)), self.timeout)
        else:
            fresh = map(work, todo)
        try:
            yield from ((p, False) if p is not None else (next(fresh), True) for p in planned)
        finally:
            getattr(fresh, "close", lambda: None)()  # stops the pool

    def write(self) -> tuple[list[Skip], list[Outcome]]:
        """Feed every outcome to its task's shards; returns the rejected inputs and the accepted outcomes."""
        skips, accepted, taken = [], [], set()
        with tqdm(total=len(self.entries), unit="input", disable=self.quiet, file=sys.stderr) as bar:
            for outcome, fresh in self.outcomes(self.plan()):
                keys = [s.key for s in outcome.samples]
                clash = next((k for k in keys if k in taken), None)
                if outcome.reason is None and clash is not None:
                    outcome = Outcome(
                        outcome.key, outcome.path, reason=f"sample key {clash!r} is already taken"
                    )
                if fresh:
                    self.progress.record_outcome(outcome)
                if outcome.reason is not None:
                    skips.append(Skip(outcome.path, outcome.reason))
                    bar.set_postfix(skipped=len(skips), refresh=False)
                elif fresh:
                    for sample in outcome.samples:
                        self.sets[outcome.task].add({"__key__": sample.key, **sample.fields})
                else:
                    self.sets[outcome.task].skip(len(outcome.samples))
                if outcome.reason is None:  # keep its statistics, not its media
                    taken.update(keys)
                    samples = [Prepared(s.key, {}, s.stats) for s in outcome.samples]
                    accepted.append(Outcome(outcome.key, outcome.path, outcome.task, samples))
                bar.update()
        return skips, accepted


def pooled(
    work: Callable[[Entry], Outcome], entries: list[Entry], workers: int, timeout: float
) -> Iterator[Outcome]:
    """`work` over a spawn pool, in input order, a few inputs ahead. An input without a result after
    `timeout` seconds (its worker was killed, e.g. for memory, or hangs) becomes a rejected Outcome;
    the pool is then replaced and the inputs in flight are given to the new one."""
    context = multiprocessing.get_context("spawn")
    queue, pending = iter(entries), deque()
    pool = context.Pool(workers)
    try:
        while True:
            while len(pending) < 2 * workers and (entry := next(queue, None)) is not None:
                pending.append((entry, pool.apply_async(work, (entry,))))
            if not pending:
                return
            entry, result = pending.popleft()
            try:
                outcome = result.get(timeout)
            except multiprocessing.TimeoutError:
                pool.terminate()
                pool.join()
                reason = f"no result within {timeout:g}s (the worker died, e.g. killed for memory, or hung)"
                outcome = Outcome(entry.key, str(entry.media), reason=reason)
                pool = context.Pool(workers)
                pending = deque((e, pool.apply_async(work, (e,))) for e, _ in pending)
            yield outcome
    finally:
        pool.terminate()
        pool.join()
