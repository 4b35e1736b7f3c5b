"""Hostile and damaged data: formats outside the allow-list are never decoded, sizes are checked from
the header before anything is allocated (peak memory measured in a fresh process), any failure of one
sample is a counted skip, damaged shards are counted faults (once, also after a resume), a changed
shard list is refused at resume, and dead or stalled loader workers end in one DataError."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hostile_media import flac_claiming, png, png_of_zeros, tiff, wav
from PIL import Image

from selfflow.configs import load_config
from selfflow.data.avio import encode_mp4
from selfflow.data.decode import DecodeLimits
from selfflow.data.pipeline import DataError, DataPipeline
from selfflow.data.shards import ShardWriter, iter_tar_samples
from selfflow.data.streams import TaskStream, decode_sample

SPEC = load_config("tiny").spec  # 1 s, 8 fps, 32x32, 16 kHz mono
ROOT = Path(__file__).resolve().parents[1]


def peak_mb(code: str, tmp_path: Path) -> float:
    """Growth of the peak RSS while a fresh interpreter runs `code` after a warm-up (MB)."""
    script = (
        textwrap.dedent("""
        import resource, warnings
        warnings.simplefilter("ignore")
        from selfflow.configs import load_config
        from selfflow.data.streams import DataError, decode_sample
        SPEC = load_config("tiny").spec
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    """)
        + textwrap.dedent(code)
        + "\nprint((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


# ---------------------------------------------------------------------- decoding
def test_image_formats_outside_the_allow_list_are_never_decoded():
    with pytest.raises(DataError, match=r"not an allowed image format \(PNG/JPEG/WEBP\)"):
        decode_sample({"__key__": "k", "png": tiff(), "txt": "a red square"}, "image", SPEC)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would start Ghostscript
    with pytest.raises(DataError, match="not an allowed image format"):
        decode_sample({"__key__": "k", "png": eps, "txt": "postscript"}, "image", SPEC)
    only_png = DecodeLimits(image_formats=["PNG"])
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40)).save(jpeg, format="JPEG")
    with pytest.raises(DataError, match=r"allowed image format \(PNG\)"):
        decode_sample({"__key__": "k", "jpg": jpeg.getvalue(), "txt": "x"}, "image", SPEC, limits=only_png)
    assert decode_sample({"__key__": "k", "png": png(), "txt": "fine"}, "image", SPEC).media[
        "image"
    ].shape == (
        3,
        32,
        32,
    )


def test_header_sizes_are_refused_before_anything_is_allocated(tmp_path):
    (tmp_path / "big.png").write_bytes(png_of_zeros(12_000, 12_000))  # 144M pixels: 432 MB decoded
    (tmp_path / "huge.flac").write_bytes(flac_claiming((1 << 36) - 1))  # "68.7G samples": 256 GiB
    grown = peak_mb(
        """
        for name, task in (("big.png", "image"), ("huge.flac", "audio")):
            field = name.split(".")[1]
            try:
                decode_sample({"__key__": "k", field: open(name, "rb").read(), "txt": "x"}, task, SPEC)
            except DataError as err:
                print(err)
        """,
        tmp_path,
    )
    assert grown < 32  # the old reader decoded the PNG in full (+432 MB) and died of MemoryError on the flac


def test_audio_rate_channels_and_duration_limits():
    for data, problem in (
        (wav(100, seconds=2.0), "sample rate 100 Hz is outside 4000..192000"),
        (wav(16_000, channels=9), "9 channels"),
        (flac_claiming(16_000 * 7200), "over the 3600s limit"),
    ):
        with pytest.raises(DataError, match=problem):
            decode_sample({"__key__": "k", "flac": data, "txt": "x"}, "audio", SPEC)
    aiff = io.BytesIO()
    soundfile.write(aiff, np.zeros(16_000, np.float32), 16_000, format="AIFF")
    with pytest.raises(DataError, match="audio format AIFF is not allowed"):
        decode_sample({"__key__": "k", "flac": aiff.getvalue(), "txt": "x"}, "audio", SPEC)
    ok = decode_sample({"__key__": "k", "wav": wav(44_100, 2.0, 2), "txt": "x"}, "audio", SPEC)
    assert ok.media["audio"].shape == (1, SPEC.num_samples)


def test_video_header_limits():
    clip = encode_mp4(np.zeros((8, 64, 96, 3), np.uint8), 8)
    raw = {"__key__": "k", "mp4": clip, "txt": "x"}
    assert decode_sample(raw, "video", SPEC).media["video"].shape == (3, 8, 32, 32)
    for limits, problem in (
        (DecodeLimits(max_frame_pixels=64 * 95), "96x64, over the 6080 pixel frame limit"),
        (DecodeLimits(video_codecs=["vp9"]), "video codec h264 is not allowed"),
        (DecodeLimits(max_fps=4), "8 frames/s, over the 4 limit"),
        (DecodeLimits(max_duration_s=0.5), "over the 0.5s limit"),
    ):
        with pytest.raises(DataError, match=problem):
            decode_sample(raw, "video", SPEC, limits=limits)
    with pytest.raises(DataError, match="cannot open media as mp4"):  # only the mp4 demuxer is tried
        decode_sample({**raw, "mp4": wav(16_000)}, "video", SPEC)


def test_video_peak_memory_does_not_grow_with_the_clip(tmp_path):
    """Frames are resized as they are picked: a 4 s 720p clip costs what a 1 s one does."""
    h, w, fps = 720, 1280, 24
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    frames = np.stack(
        [np.broadcast_to(((ramp + 7 * i) % 256).astype(np.uint8), (h, w, 3)) for i in range(96)]
    )
    (tmp_path / "hd.mp4").write_bytes(encode_mp4(frames, fps, crf=30))
    del frames
    code = """
        import dataclasses
        from selfflow.data.avio import decode_av
        spec = dataclasses.replace(SPEC, duration={seconds}, fps=24)
        print(decode_av(open("hd.mp4", "rb").read(), spec, audio=False).video.shape)
    """
    short, long = (peak_mb(code.format(seconds=s), tmp_path) for s in (1.0, 4.0))
    bound = (16 * 1.5 * h * w + 3 * h * w) / 2**20 + 16  # decoder references + one RGB frame + slack
    assert long < bound and long < short + 8  # the old reader held every picked frame: +350 MB at 4 s


def test_any_failure_of_one_sample_is_a_counted_skip(tmp_path, monkeypatch):
    with ShardWriter(tmp_path, "image") as w:
        w.write({"__key__": "good_0", "png": png(0), "txt": "a"})
        w.write({"__key__": "oom", "png": png(1), "txt": "b"})
        w.write({"__key__": "big", "png": png(2), "txt": "c", "json": "x" * 3000})
        w.write({"__key__": "good_1", "png": png(3), "txt": "d"})
    import selfflow.data.streams as streams

    real = streams.open_image

    def open_image(data, limits):
        if data == png(1):
            raise MemoryError("out of memory")  # what a decoder throws on a file it cannot fit
        return real(data, limits)

    monkeypatch.setattr(streams, "open_image", open_image)
    limits = DecodeLimits(max_field_mb=0.002)  # 2000 bytes: the json of "big" is not read
    stream = TaskStream("image", [str(tmp_path / "image-000000.tar")], SPEC, shuffle_buffer=0, limits=limits)
    assert [next(stream).key for _ in range(2)] == ["good_0", "good_1"]
    reasons = {k.split(":")[-1]: r for k, r in stream.skipped.items()}
    assert reasons == {"oom": "MemoryError: out of memory", "big": "field json is 3000 bytes, over the limit"}
    assert stream.skipped_count == 2 and [w.split(":")[-1] for w, _ in stream.recent] == ["oom", "big"]


# ---------------------------------------------------------------------- shards
def _image_shards(folder: Path, shards: int = 2, per_shard: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, "image", max_samples=per_shard) as w:
        for i in range(shards * per_shard):
            w.write({"__key__": f"s{i:03d}", "png": png(i % 20), "txt": f"square {i}"})
    return sorted(str(p) for p in folder.glob("image-*.tar"))


@pytest.mark.parametrize("cut", ["header", "block"])
def test_a_shard_cut_inside_a_header_is_a_counted_fault(tmp_path, cut):
    paths = _image_shards(tmp_path, shards=1)
    data = Path(paths[0]).read_bytes()
    with tarfile.open(paths[0]) as tar:
        headers = [m.offset for m in tar]
    at = headers[6] + (100 if cut == "header" else 0)  # inside / at the start of the 4th sample's header
    Path(paths[0]).write_bytes(data[:at])
    keys = []
    with pytest.raises(tarfile.ReadError, match="tar header|end-of-archive"):
        keys.extend(s["__key__"] for s in iter_tar_samples(paths[0]))
    assert keys == ["s000", "s001"]  # s002 is whole, but the damage might have cut a member of it
    stream = TaskStream("image", paths, SPEC, shuffle_buffer=0)
    assert [next(stream).key for _ in range(3)] == ["s000", "s001", "s000"]
    assert stream.skipped_count == 1 and list(stream.skipped) == [f"{paths[0]}:*"]


def test_a_resumed_stream_counts_each_fault_once(tmp_path):
    paths = _image_shards(tmp_path / "shards", shards=3, per_shard=4)
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:3000])  # shard 1 ends inside sample 2
    kwargs = dict(shuffle_buffer=3, seed=5)
    straight = TaskStream("image", paths, SPEC, **kwargs)
    keys = [next(straight).key for _ in range(20)]  # more than an epoch: the damage is met twice
    first = TaskStream("image", paths, SPEC, **kwargs)
    resumed_keys = [next(first).key for _ in range(9)]
    resumed = TaskStream("image", paths, SPEC, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed_keys += [next(resumed).key for _ in range(11)]
    assert resumed_keys == keys
    assert resumed.skipped_count == straight.skipped_count >= 2


def test_a_changed_shard_list_is_refused_at_resume(tmp_path):
    _image_shards(tmp_path, shards=2)
    pipe = DataPipeline(tmp_path, SPEC, batch_size=2, shuffle_buffer=0)
    next(pipe)
    state = json.loads(json.dumps(pipe.state_dict()))
    DataPipeline(tmp_path, SPEC, batch_size=2, shuffle_buffer=0).load_state_dict(state)  # unchanged: fine
    shutil.copy(tmp_path / "image-000001.tar", tmp_path / "image-000002.tar")  # a shard was added
    with pytest.raises(DataError, match="shard list of task.* image differs.*allow_changed_shards"):
        DataPipeline(tmp_path, SPEC, batch_size=2, shuffle_buffer=0).load_state_dict(state)
    changed = DataPipeline(tmp_path, SPEC, batch_size=2, shuffle_buffer=0, allow_changed_shards=True)
    changed.load_state_dict(state)
    assert len(next(changed).keys) == 2


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_loader_worker_ends_in_one_data_error(tmp_path, fault):
    """A worker killed (as the OOM killer does) or stuck in a decoder that never returns (the worker
    processes are forked, so the patched decoder is theirs) ends the run with one DataError, raised by
    next() even when the worker died while the main process was doing something else."""
    _image_shards(tmp_path / "shards", shards=2)
    script = textwrap.dedent(f"""
        import multiprocessing, os, signal, time
        import selfflow.data.streams as streams
        from selfflow.configs import load_config
        from selfflow.data.pipeline import DataError, WorkerPipeline
        real = streams.decode_sample
        def decode_sample(raw, *args):
            if "{fault}" == "hung" and raw["__key__"] in ("s004", "s010"):
                time.sleep(1000)
            return real(raw, *args)
        streams.decode_sample = decode_sample
        spec = load_config("tiny").spec
        pipe = WorkerPipeline(dict(shards="{tmp_path / "shards"}", spec=spec, batch_size=2), 2, timeout=3)
        try:
            for i in range(20):
                next(pipe)
                if i == 0 and "{fault}" == "killed":
                    time.sleep(1)
                    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
                    time.sleep(1)  # the death is noticed here, outside next(): a training step
            print("no error")
        except DataError as err:
            print("DataError:", err)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    last = (done.stdout.strip().splitlines() or [done.stderr])[-1]
    expected = ("killed by signal", "exited unexpectedly") if fault == "killed" else ("timed out after 3 s",)
    assert last.startswith("DataError: data loader:") and any(e in last for e in expected), last


# ---------------------------------------------------------------------- make_shards
def die_on_victim(entry, **kwargs):
    """make_shards' work for one input, except that the worker given `victim` is killed (SIGKILL, as
    the OOM killer does). Module level: the spawned pool workers import it from this file."""
    from selfflow.data.prepare import prepare

    if entry.key == "victim":
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare(entry, **kwargs)


@pytest.mark.slow
def test_make_shards_lists_hostile_inputs_and_a_killed_worker_in_skipped(tmp_path):
    from selfflow.tools import make_shards

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files = {"tiff.png": tiff(), "huge.flac": flac_claiming((1 << 36) - 1), "slow.wav": wav(100, 2.0)}
    files |= {"victim.png": png(1), "big.png": png_of_zeros(12_000, 12_000)}
    files |= {f"good_{i}.png": png(i) for i in range(4)}
    for name, data in files.items():
        (inputs / name).write_bytes(data)
        (inputs / name).with_suffix(".txt").write_text(f"caption of {name}")
    args = make_shards.parse_args(["--input", str(inputs), "--output", str(out), "--workers", "2",
                                   "--timeout", "10", "--quiet"])  # fmt: skip
    summary = make_shards.build(args, work=die_on_victim)
    assert "wrote 4 image samples" in summary and "skipped 5" in summary
    reasons = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").open())}
    assert reasons == {
        "tiff.png": "cannot decode image: not an allowed image format (PNG/JPEG/WEBP)",
        "huge.flac": "media lasts 4294967s, over the 3600s limit",
        "slow.wav": "audio sample rate 100 Hz is outside 4000..192000",
        "big.png": "cannot decode image: image is 12000x12000, over the 50000000 pixel limit",
        "victim.png": "no result within 10s (the worker died, e.g. killed for memory, or hung)",
    }
    with pytest.raises(SystemExit) as exit_info:  # an invalid limit is a usage error
        make_shards.parse_args(["--input", str(inputs), "--output", str(out), "--limit", "max_channels=0"])
    assert exit_info.value.code == 2


def test_a_crafted_tar_header_that_trips_tarfile_is_a_counted_fault(tmp_path):
    """tarfile raises a bare ValueError on a pax sparse map that is not numbers: still a shard fault."""
    crafted = tmp_path / "image-000000.tar"
    with tarfile.open(crafted, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in (
            ("a.png", png(1), {}),
            (
                "a.txt",
                b"a square",
                {"GNU.sparse.map": "zz,1", "GNU.sparse.major": "0", "GNU.sparse.minor": "1"},
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tar.addfile(info, io.BytesIO(data))
    good = _image_shards(tmp_path / "good", shards=1)
    stream = TaskStream("image", [str(crafted), *good], SPEC, shuffle_buffer=0)
    keys = [next(stream).key for _ in range(5)]
    assert set(keys) <= {f"s{i:03d}" for i in range(6)}
    assert stream.skipped == {f"{crafted}:*": "unreadable shard from here on: damaged tar header "
                              "(ValueError: invalid literal for int() with base 10: 'zz')"}  # fmt: skip


def test_a_deferred_worker_death_raised_on_entry_leaves_the_watch_closed():
    """A dead worker noticed outside next() raises when next() is entered; the watch must then not
    stay 'inside', or every later SIGCHLD would raise wherever the main thread is."""
    from selfflow.data.pipeline import _ChildWatch

    watch = _ChildWatch()

    def dead(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")

    watch.torch_handler = dead
    watch._on_child(17, None)  # outside next(): only noted
    assert watch.pending and watch.inside == 0
    with pytest.raises(RuntimeError, match="killed by signal"), watch:
        pass
    assert watch.inside == 0 and not watch.pending
