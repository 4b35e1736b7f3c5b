"""What a WebDataset sample holds, read from its field names the way corpora in the wild name them
(img2dataset: `jpg` + `txt` + `json`; video2dataset: `mp4` + `txt` + `json`; audio sets: `flac`, `mp3`,
`m4a`, ...): which field is the media, which task the sample feeds, and its caption.

    task = infer_task(raw)               # "image" | "video" | "av" | "audio", ValueError if none fits
    field = media_field(raw, task)       # e.g. "jpg"
    caption = caption_of(raw, "caption") # txt, else a caption field, else json["caption"]

A video container with an audio stream is an `av` sample, one without is a `video` sample (the header
is probed; nothing is decoded). No torch here.
"""

from __future__ import annotations

import json

from selfflow.data.avio import has_audio_stream
from selfflow.data.decode import LIMITS, DecodeLimits

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
VIDEO_CONTAINERS = {"mp4": "mp4", "mov": "mp4", "m4v": "mp4", "webm": "matroska", "mkv": "matroska"}
AUDIO_CONTAINERS = {"flac": None, "wav": None, "mp3": None, "ogg": None, "opus": None, "m4a": "mp4"}
# None: read by libsndfile (its formats are data.limits.audio_formats); else the only demuxer tried
TASK_MODALITIES = {"image": ("image",), "video": ("video",), "audio": ("audio",), "av": ("video", "audio")}
TASK_FIELDS = {
    "image": IMAGE_FIELDS,
    "video": tuple(VIDEO_CONTAINERS),
    "audio": tuple(AUDIO_CONTAINERS),
    "av": tuple(VIDEO_CONTAINERS),
}


def media_field(raw: dict, task: str) -> str | None:
    """The first field of `raw` that holds media of `task`, or None."""
    return next((f for f in TASK_FIELDS[task] if f in raw), None)


def infer_task(raw: dict, limits: DecodeLimits = LIMITS) -> str:
    """The task a sample feeds, from its fields (video first: a clip may come with a jpg thumbnail; then
    images, then audio; make_shards' tar input takes the same order); ValueError when it has no media
    field this reader knows, or its video container cannot be opened."""
    video = media_field(raw, "video")
    if video is not None:
        return "av" if has_audio_stream(raw[video], VIDEO_CONTAINERS[video]) else "video"
    if media_field(raw, "image") is not None:
        return "image"
    if media_field(raw, "audio") is not None:
        return "audio"
    fields = sorted(k for k in raw if not k.startswith("__")) or ["none"]
    raise ValueError(f"no media field this reader knows (fields: {', '.join(fields)})")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError("caption is not UTF-8") from err
    return str(value).strip()


def caption_of(raw: dict, caption_key: str = "caption") -> str:
    """The caption: the `txt` field, else a `caption` field, else the `caption_key` entry of the `json`
    field; ValueError when none holds text."""
    for name in ("txt", "caption"):
        if name in raw and (text := _text(raw[name])):
            return text
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, TypeError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get(caption_key), str) and meta[caption_key].strip():
            return meta[caption_key].strip()
    raise ValueError(f"missing or empty caption (no txt, caption or json {caption_key!r})")
