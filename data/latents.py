"""Codec latents stored in shards: written by make_shards `--latents DIR` (a sample's media, decoded
exactly as the training pipeline decodes them, encoded by a frozen diffusers autoencoder) and read by
training in place of decoding and encoding the media.

    options = LatentOptions(("ae/kl", "ae/oobleck"), spec)  # AutoencoderKL: image + video; Oobleck: audio
    latent_fields("av", {"mp4": data}, options)  # {"video_latent.npy": ..., "audio_latent.npy": ...}
    options.record()  # the manifest's "latents": {modality: codec class, config / weights hash, shape}
    stored_modalities("shards/", {}, ["av"], {"video": "ae/wan"}, spec)  # frozenset({"video"}) or DataError

Fields (float32 `.npy`, no batch axis): image `latent.npy` [C, h, w], video `video_latent.npy`
[C, T, h, w], audio `audio_latent.npy` [C, n]; an av sample gets both of its modalities. The codec is
checked against the clip spec (latent channels, strides), so the spec must describe the codec.

Training reads a modality's latents when every shard folder that feeds it was made with the run's codec
(`stored_modalities`: class, config and, when the run's folder has them, weights; and the latent shape of
the run's spec); a folder with latents of another codec is a DataError at start, a source without stored
latents (a folder made without `--latents`, a tar pattern, a URL) makes the run encode that modality.

Torch runs single-threaded here: the float sums are then the same in every process, and the shard
bytes do not depend on `--workers`. Torch and diffusers are imported only when latents are asked for.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.data.avio import decode_audio, decode_av
from selfflow.data.decode import IMAGE_FIELDS, open_image, resize_center_crop, to_channels
from selfflow.data.fields import TASK_MODALITIES, VIDEO_CONTAINERS
from selfflow.data.sources import MANIFEST, split_sources
from selfflow.tokenizers.codecs import SUPPORTED_AUTOENCODERS, codec_stamp
from selfflow.tokenizers.spec import ClipSpec

MODALITY_NAMES = ("image", "video", "audio")
LATENT_FIELDS = {"image": "latent.npy", "video": "video_latent.npy", "audio": "audio_latent.npy"}
_CODECS: dict = {}  # per process: (folder, modality, spec) -> codec, loaded once


@dataclass(frozen=True)
class LatentOptions:
    folders: tuple[str, ...]  # diffusers autoencoder folders (config.json + weights)
    spec: ClipSpec

    def sources(self) -> dict[str, str]:
        """modality -> autoencoder folder. An entry `video=DIR` names its modality; a bare `DIR` serves
        what its class codes (config.json), a class of one modality (Wan: video) before a class of several
        (KL: image and video), which fills the rest."""
        classes, found = {}, {}
        for entry in self.folders:
            named, _, rest = entry.partition("=")
            folder = rest if named in MODALITY_NAMES and rest else entry
            config = Path(folder) / "config.json"
            if not config.is_file():
                raise ValueError(f"--latents {folder}: no config.json (not a diffusers autoencoder folder)")
            name = json.loads(config.read_text()).get("_class_name")
            if name not in SUPPORTED_AUTOENCODERS:
                raise ValueError(
                    f"--latents {folder}: {name!r} is not one of {', '.join(SUPPORTED_AUTOENCODERS)}"
                )
            if folder != entry:
                if named not in SUPPORTED_AUTOENCODERS[name] or named in found:
                    raise ValueError(
                        f"--latents {entry}: {name} cannot code {named}, or {named} is named twice"
                    )
                found[named] = folder
            else:
                classes[folder] = SUPPORTED_AUTOENCODERS[name]
        for single in (True, False):
            taken = dict(found)
            for folder, modalities in classes.items():
                if (len(modalities) == 1) != single:
                    continue
                for modality in modalities:
                    if modality in taken:
                        continue  # named, or a one-modality codec has it
                    if modality in found:
                        raise ValueError(
                            f"--latents: two autoencoders for {modality} ({found[modality]}, {folder})"
                        )
                    found[modality] = folder
        return found

    def record(self) -> dict[str, dict]:
        """What the manifest says of the latents: per modality the codec's stamp and the latent shape."""
        return {
            m: {**codec_stamp(folder), "shape": list(self.spec.latent_shape(m))}
            for m, folder in self.sources().items()
        }

    def stamp(self) -> list:
        """What identifies the codecs for resuming: every file's name, size and modification time."""
        folders = set(self.sources().values())
        files = sorted(p for folder in folders for p in Path(folder).glob("*") if p.is_file())
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _codec(folder: str, modality: str, spec: ClipSpec):  # noqa: ANN202 (a torch module; torch loads lazily)
    key = (folder, modality, spec)
    if key not in _CODECS:
        import torch

        from selfflow.tokenizers.codecs import build_codec

        torch.set_num_threads(1)  # see the module docstring
        with warnings.catch_warnings():  # diffusers' Oobleck still builds on the deprecated weight_norm
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            _CODECS[key] = build_codec(folder, modality, spec)
    return _CODECS[key]


def check_latents(options: LatentOptions) -> None:
    """Load every codec once and check it against the spec (ValueError / OSError if it does not fit)."""
    for modality, folder in options.sources().items():
        _codec(folder, modality, options.spec)


def _pixels(modality: str, task: str, fields: dict, spec: ClipSpec) -> np.ndarray:
    """The media as the training pipeline sees them: float32 in [-1, 1], channels first."""
    if modality == "image":
        data = next(fields[f] for f in IMAGE_FIELDS if f in fields)
        img = resize_center_crop(
            to_channels(open_image(data), spec.video_channels), spec.image_height, spec.image_width
        )
        pixels = np.asarray(img, np.float32).reshape(spec.image_height, spec.image_width, -1)
        return pixels.transpose(2, 0, 1) / 127.5 - 1
    if task == "audio":
        return decode_audio(fields["flac"], spec)
    name = next(f for f in ("mp4", "webm", "mkv") if f in fields)  # the field make_shards kept the video in
    box = VIDEO_CONTAINERS[name]
    if modality == "video":
        video = decode_av(fields[name], spec, audio=False, container=box).video
        return video.astype(np.float32).transpose(3, 0, 1, 2) / 127.5 - 1  # [C, T, H, W]
    return decode_av(fields[name], spec, video=False, container=box).audio


def latent_fields(task: str, fields: dict, options: LatentOptions) -> dict[str, bytes]:
    """`.npy` latents of the sample's modalities that have a codec."""
    import torch

    out = {}
    for modality, folder in options.sources().items():
        if modality not in TASK_MODALITIES[task]:
            continue
        x = torch.from_numpy(np.ascontiguousarray(_pixels(modality, task, fields, options.spec)))[None]
        z = _codec(folder, modality, options.spec).encode(x)[0].numpy().astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, z, allow_pickle=False)
        out[LATENT_FIELDS[modality]] = buf.getvalue()
    return out


# ---------------------------------------------------------------- reading them back
class LatentMismatch(ValueError):
    """Shards whose stored latents do not fit the run's codec or spec."""


def read_latent(raw: dict, modality: str, spec: ClipSpec) -> np.ndarray:
    """A sample's stored latents of `modality` as float32, channels first; ValueError naming the problem.
    The `.npy` header is checked (shape of the spec, float32 / float16, C order, the byte count) before
    anything is allocated, and nothing is unpickled."""
    name = LATENT_FIELDS[modality]
    if name not in raw:
        raise ValueError(f"no {name} field (this run reads stored {modality} latents)")
    data, shape = raw[name], spec.latent_shape(modality)
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format version {version}")
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        got, fortran, dtype = read(f)
    except ValueError as err:
        raise ValueError(f"{name} is not an .npy array ({err})") from err
    if tuple(got) != shape or fortran or dtype not in (np.dtype("<f4"), np.dtype("<f2")):
        raise ValueError(f"{name} holds {dtype} {tuple(got)}; the spec needs float32 {shape}")
    body = memoryview(data)[f.tell() :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{name} has {len(body)} bytes of data for {shape} {dtype}")
    return np.frombuffer(body, dtype).reshape(shape).astype(np.float32)


def _manifest(source: str) -> dict | None:
    path = Path(source) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _check(record: object, run: dict, shape: tuple[int, ...], modality: str, source: str) -> None:
    """LatentMismatch unless a manifest's record of `modality` latents is of the run's codec and shape."""
    fix = "rebuild the shards with make_shards --latents <the run's codec>, or set data.latents=never"
    if not isinstance(record, dict):
        raise LatentMismatch(
            f"{source}: its {modality} latents carry no codec stamp (older make_shards); {fix}"
        )
    same = record.get("class") == run["class"] and record.get("config") == run["config"]
    if run["weights"] is not None and record.get("weights") != run["weights"]:
        same = False
    if not same:
        had = f"{record.get('class')} config {record.get('config')} weights {record.get('weights')}"
        want = f"{run['class']} config {run['config']} weights {run['weights'] or '(not in the folder)'}"
        raise LatentMismatch(
            f"{source} holds {modality} latents of another codec ({had}; codecs.{modality} is {want}); {fix}"
        )
    if tuple(record.get("shape", ())) != shape:
        raise LatentMismatch(
            f"{source} holds {modality} latents of shape {tuple(record.get('shape', ()))}, the run's spec "
            f"needs {shape}; {fix}"
        )


def stored_modalities(
    shards: str, task_shards: dict[str, str], tasks: list[str], codecs: dict[str, str], spec: ClipSpec
) -> frozenset[str]:
    """The modalities this run reads from stored latents instead of encoding media: those whose codec
    (`codecs`: {modality: autoencoder folder}; "identity" never) stamped the latents of every source that
    feeds a task of the modality. LatentMismatch at the first source with latents of another codec."""
    sources = [(s, _manifest(s)) for s in split_sources(shards)]
    typed = [(task, s) for task, value in (task_shards or {}).items() for s in split_sources(value)]
    use = set()
    for modality, folder in codecs.items():
        wanted = [t for t in tasks if modality in TASK_MODALITIES[t]]
        if folder == "identity" or not wanted:
            continue
        run, shape = codec_stamp(folder), spec.latent_shape(modality)
        feeding = [
            (s, manifest) for s, manifest in sources
            if manifest is None or any(manifest.get("counts", {}).get(t) for t in wanted)
        ] + [(s, None) for task, s in typed if task in wanted]  # fmt: skip
        stored = [(s, (manifest or {}).get("latents", {}).get(modality)) for s, manifest in feeding]
        for source, record in stored:
            if record is not None:
                _check(record, run, shape, modality, source)
        if feeding and all(record is not None for _, record in stored):
            use.add(modality)
    return frozenset(use)
