"""The image data path on real Fashion-MNIST: benchmark folder -> shards (with bad inputs) -> batches.

The command-line tools run as subprocesses from the repository root, exactly as a user runs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.data.packaged import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_caption,
    load_fashion_mnist,
    with_article,
)
from selfflow.data.pipeline import DataPipeline
from selfflow.data.shards import MTIME, ShardWriter, iter_tar_samples, sha256_file
from selfflow.data.sources import describe_shards, resolve_shards
from selfflow.data.streams import TaskStream
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tools import make_benchmark

REPO = Path(__file__).resolve().parents[1]
N = 50
SPEC = ClipSpec(image_height=32, image_width=32, image_patch=8)
BAD_INPUTS = {  # file injected into the benchmark folder -> a word its skip reason must contain
    "truncated.png": "decode",
    "blank.png": "empty caption",
    "uncaptioned.png": "missing caption",
    "notes.xyz": "unknown file type",
}

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist",
)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def make_bench(out: Path, seed: int, n: int = N) -> Path:
    argv = ["--task", "class", "--split", "test", "--n", str(n), "--seed", str(seed), "--out", str(out)]
    assert make_benchmark.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "fmnist", seed=7)


@pytest.fixture(scope="module")
def dirty(bench: Path, tmp_path_factory) -> Path:
    """The benchmark folder plus one input of every kind make_shards must reject."""
    folder = tmp_path_factory.mktemp("dirty") / "in"
    shutil.copytree(bench, folder)
    png = sorted(bench.glob("*.png"))[0].read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.txt").write_text("a photo of a bag\n")
    (folder / "blank.png").write_bytes(png)
    (folder / "blank.txt").write_text("  \n")
    (folder / "uncaptioned.png").write_bytes(png)
    (folder / "notes.xyz").write_text("not media")
    return folder


@pytest.fixture(scope="module")
def shards(dirty: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("shards") / "out"
    done = run_tool(
        "tools/make_shards.py", "--input", str(dirty), "--output", str(out), "--shard-samples", "16"
    )
    return out, done


# ---------------------------------------------------------------------- packaged data and benchmark
def test_fashion_mnist_loads_with_balanced_labels():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    assert 0 < images.mean() < 255  # real pixels, not a zero buffer


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")


def test_captions_use_the_right_article():
    assert fashion_mnist_caption(7) == "a photo of a sneaker"
    assert fashion_mnist_caption(9) == "a photo of an ankle boot"
    assert [with_article(w) for w in ("apple", "unicorn", "hour", "dog")] == [
        "an apple",
        "a unicorn",
        "an hour",
        "a dog",
    ]


def test_benchmark_is_deterministic_balanced_and_labelled(bench: Path, tmp_path):
    assert folder_bytes(make_bench(tmp_path / "again", seed=7)) == folder_bytes(bench)
    assert folder_bytes(make_bench(tmp_path / "other", seed=8)).keys() != folder_bytes(bench).keys()
    metas = [json.loads(p.read_text()) for p in sorted(bench.glob("*.json"))]
    assert len(metas) == N and all("." not in p.stem for p in bench.iterdir())
    assert np.bincount([m["label"] for m in metas]).tolist() == [N // 10] * 10
    images, labels = load_fashion_mnist("test")
    for meta in metas:
        key = f"fmnist_test_{meta['index']:06d}"
        assert (
            meta["label"] == labels[meta["index"]] and meta["class"] == FASHION_MNIST_CLASSES[meta["label"]]
        )
        assert (bench / f"{key}.txt").read_text().strip() == fashion_mnist_caption(meta["label"])
    first = metas[0]["index"]
    stored = np.asarray(Image.open(bench / f"fmnist_test_{first:06d}.png"))
    assert np.array_equal(stored, images[first])  # the PNG holds the dataset's pixels exactly


def test_benchmark_refuses_to_clobber_a_folder(bench: Path):
    argv = ["--task", "class", "--n", "5", "--seed", "0", "--out", str(bench)]
    assert make_benchmark.main(argv) == 1
    assert len(list(bench.glob("*.png"))) == N


# ---------------------------------------------------------------------- make_shards
def test_make_shards_skips_bad_inputs_and_writes_a_manifest(shards, dirty: Path):
    out, done = shards
    assert done.returncode == 0, done.stderr
    assert f"{N} image samples" in done.stdout and f"skipped {len(BAD_INPUTS)}" in done.stdout
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {Path(s["path"]).name: s["reason"] for s in skipped}.keys() == BAD_INPUTS.keys()
    for record in skipped:
        assert BAD_INPUTS[Path(record["path"]).name] in record["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"image": N} and manifest["resolutions"] == {"image": {"28x28": N}}
    infos = manifest["shards"]["image"]
    assert [i["samples"] for i in infos] == [16, 16, 16, 2]
    for info in infos:
        assert sha256_file(out / info["file"]) == info["sha256"]
    assert describe_shards(out)["counts"] == {"image": N}


def test_shards_round_trip_the_input_files(shards, dirty: Path):
    out, _ = shards
    samples = [s for tar in sorted(out.glob("image-*.tar")) for s in iter_tar_samples(tar)]
    assert [s["__key__"] for s in samples] == sorted(p.stem for p in dirty.glob("fmnist_*.png"))
    for sample in samples:
        key = sample["__key__"]
        assert sample["png"] == (dirty / f"{key}.png").read_bytes()
        assert sample["txt"].decode() == (dirty / f"{key}.txt").read_text().strip()
        assert json.loads(sample["json"]) == json.loads((dirty / f"{key}.json").read_text())


def test_make_shards_rerun_is_byte_identical_and_verifies(shards, dirty: Path, tmp_path):
    out, _ = shards
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = run_tool(
        "tools/make_shards.py", "--input", str(dirty), "--output", str(out), "--shard-samples", "16"
    )
    fresh = tmp_path / "fresh"
    other = run_tool(
        "tools/make_shards.py",
        "--input",
        str(dirty),
        "--output",
        str(fresh),
        "--shard-samples",
        "16",
        "--verify",
    )
    assert again.returncode == 0 and other.returncode == 0, other.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert {p.name: p.read_bytes() for p in fresh.glob("*.tar")} == before
    assert "matches its manifest" in other.stdout
    with tarfile.open(out / "image-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (MTIME, 0, 0, "", "", 0o644)
    }
    names = [m.name for m in members]
    assert names[:3] == sorted(names[:3]) and names[0].endswith(".json")  # fields of a sample in sorted order


def test_verify_catches_a_damaged_shard(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards[0], copy)
    shard = copy / "image-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data
    shard.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"]["image"][2]["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    done = run_tool("tools/make_shards.py", "--output", str(copy), "--verify")
    assert done.returncode == 1 and "image-000001.tar: sha256" in done.stderr
    assert "image-000002.tar: 16 samples, manifest says 17" in done.stderr


def test_make_shards_bad_paths_fail_with_one_line(tmp_path, dirty: Path):
    missing = run_tool(
        "tools/make_shards.py", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")
    )
    blocked = tmp_path / "file"
    blocked.write_text("x")
    unwritable = run_tool("tools/make_shards.py", "--input", str(dirty), "--output", str(blocked / "o"))
    for done, words in ((missing, "does not exist"), (unwritable, "cannot write")):
        assert done.returncode != 0 and words in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_make_shards_resizes_and_fails_when_nothing_is_valid(dirty: Path, tmp_path):
    resized = run_tool(
        "tools/make_shards.py", "--input", str(dirty), "--output", str(tmp_path / "r"), "--size", "20x24"
    )
    assert resized.returncode == 0, resized.stderr
    manifest = describe_shards(tmp_path / "r")
    assert manifest["resolutions"] == {"image": {"20x24": N}} and manifest["args"]["size"] == "20x24"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    (junk / "a.txt").write_text("a caption")
    done = run_tool("tools/make_shards.py", "--input", str(junk), "--output", str(tmp_path / "j"))
    assert done.returncode == 1 and "no valid samples" in done.stderr
    assert "a.png" in (tmp_path / "j" / "skipped.jsonl").read_text()


def test_shard_writer_splits_by_size_and_cleans_up(tmp_path):
    payload = bytes(range(256)) * 40  # 10 kB, 20 tar blocks + a header
    with ShardWriter(tmp_path, "blob", max_mb=0.05) as writer:
        for i in range(8):
            writer.write({"__key__": f"s{i}", "bin": payload, "txt": f"sample {i}"})
    assert sum(s.samples for s in writer.shards) == 8 and len(writer.shards) > 1
    assert all(s.bytes <= 50_000 for s in writer.shards)
    back = [s for info in writer.shards for s in iter_tar_samples(tmp_path / info.file)]
    assert [s["txt"] for s in back] == [f"sample {i}".encode() for i in range(8)]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "broken") as broken:
        broken.write({"__key__": "x", "bin": payload})
        raise RuntimeError("crash while writing")
    assert not list(tmp_path.glob("broken*"))  # no half-written shard, no temp file
    with pytest.raises(ValueError, match="key"):
        ShardWriter(tmp_path, "dots").write({"__key__": "a.b", "bin": payload})


# ---------------------------------------------------------------------- reading (data/pipeline.py)
def test_batches_have_the_right_shape_range_and_captions(shards, bench: Path):
    out, _ = shards
    classes = {p.stem: json.loads(p.read_text())["class"] for p in bench.glob("*.json")}
    pipe = DataPipeline(out, SPEC, seed=0, batch_size=8)
    seen = []
    for _ in range(N // 8):  # within the first epoch
        batch = next(pipe)
        pixels = batch.media["image"]
        assert batch.task == "image" and pixels.shape == (8, 3, 32, 32) and pixels.dtype == torch.float32
        assert pixels.min() == -1 and pixels.max() <= 1  # black background -> -1
        source = np.stack([np.asarray(Image.open(bench / f"{key}.png")) for key in batch.keys])  # [B, 28, 28]
        assert abs(pixels.mean().item() - (source.mean() / 127.5 - 1)) < 0.02  # resizing keeps brightness
        assert torch.equal(pixels[:, 0], pixels[:, 1])  # grey expanded to RGB
        for key, caption in zip(batch.keys, batch.captions, strict=True):
            assert caption == f"a photo of {with_article(classes[key])}"
        seen += batch.keys
    assert len(set(seen)) == len(seen) == N // 8 * 8
    assert pipe.streams["image"].epoch == 0 and pipe.skipped_count == 0


def test_batches_are_deterministic_per_seed_and_epoch(shards):
    out, _ = shards
    files = resolve_shards(out)

    def first(seed: int, epoch: int = 0, buffer: int = 256, n: int = 16) -> list:
        stream = TaskStream("image", files, SPEC, seed, epoch=epoch, shuffle_buffer=buffer)
        return [next(stream) for _ in range(n)]

    a, b = first(5), first(5)
    assert [x.key for x in a] == [x.key for x in b]
    assert all(np.array_equal(x.media["image"], y.media["image"]) for x, y in zip(a, b, strict=True))
    assert [x.key for x in first(5, epoch=1)] != [x.key for x in a]
    assert [x.key for x in first(6)] != [x.key for x in a]
    # without a buffer samples come shard by shard in stored order, and the shard order changes per epoch
    shard_of = {s["__key__"]: tar.name for tar in out.glob("image-*.tar") for s in iter_tar_samples(tar)}
    firsts = [[x.key for x in first(5, epoch=e, buffer=0)] for e in range(4)]
    for keys in firsts:
        runs = [[k for k in keys if shard_of[k] == name] for name in {shard_of[k] for k in keys}]
        assert all(run == sorted(run) for run in runs) and len(runs) <= 2
    assert len({shard_of[keys[0]] for keys in firsts}) > 1


def test_shard_sources_resolve_alike(shards):
    out, _ = shards
    files = sorted(str(p) for p in out.glob("image-*.tar"))
    assert resolve_shards(out) == files
    assert resolve_shards(f"{out}/image-*.tar") == files
    assert resolve_shards(f"{out}/image-{{000000..000003}}.tar") == files
    assert resolve_shards([Path(f) for f in files]) == files
    with pytest.raises(FileNotFoundError):
        resolve_shards(out / "image-000009.tar")


def test_reader_skips_bad_samples_and_counts_them(shards, tmp_path):
    out, _ = shards
    good = list(iter_tar_samples(out / "image-000000.tar"))[:10]
    with ShardWriter(tmp_path, "image") as writer:
        for sample in good:
            writer.write(sample)
        writer.write({"__key__": "corrupt", "png": good[0]["png"][:40], "txt": "a photo of a bag"})
        writer.write({"__key__": "silent", "png": good[0]["png"]})
        writer.write({"__key__": "empty", "png": good[0]["png"], "txt": " "})
    stream = TaskStream("image", resolve_shards(tmp_path), SPEC, 0, shuffle_buffer=4)
    keys = [next(stream).key for _ in range(20)]  # epochs 0 and 1 hold 10 good samples each
    assert sorted(keys) == sorted([s["__key__"] for s in good] * 2) and stream.epoch == 1
    reasons = {k.split(":")[-1]: r for k, r in stream.skipped.items()}
    assert set(reasons) == {"corrupt", "silent", "empty"}
    assert 3 <= stream.skipped_count <= 6  # counted again in every epoch read
    assert "caption" in reasons["silent"] and "decode" in reasons["corrupt"]
