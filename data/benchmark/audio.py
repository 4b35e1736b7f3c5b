"""T2A: one spoken word per clip, as FLAC: "a voice says four", "a voice says tango".

Words are the numbers Asterisk has recordings for (zero..twenty and the tens) and the NATO
alphabet. The voice is Asterisk's recorded speaker or one of flite's four voices (--voice). The
word starts at a random time in a clip of fixed --duration over a faint noise floor; the json holds
the word, voice, and the speech onset/offset in seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from selfflow.data.benchmark import sound
from selfflow.data.benchmark.common import NUMBER_WORDS, TENS_WORDS, Item, Task, check_n, cycled, item_rng

NATO = (  # noqa: SIM905 (a word list reads best as one string)
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"
    " quebec romeo sierra tango uniform victor whiskey x-ray yankee zulu"
).split()
# (Asterisk prompt, the word it says): the prompts' file names are their transcripts
WORDS = (
    tuple((f"digits/{n}", word) for n, word in enumerate(NUMBER_WORDS))
    + tuple((f"digits/{n}", word) for n, word in TENS_WORDS.items())
    + tuple((f"phonetic/{word[0]}_p", word) for word in NATO)
)
_MARGIN_S = 0.05  # silence kept before and after the word


def audio_items(args: argparse.Namespace) -> Iterator[Item]:
    """--n clips of --duration seconds at --sample-rate."""
    check_n(args.n)
    if args.sample_rate < 8000:
        raise ValueError(f"--sample-rate must be at least 8000, not {args.sample_rate}")
    voice = sound.resolve_voice(args.voice)
    length = round(args.duration * args.sample_rate)
    for index in range(args.n):
        rng = item_rng(args.seed, "audio", index)
        prompt, word = WORDS[cycled(args.seed, "audio-word", index, len(WORDS))]
        speech, speaker = sound.spoken(prompt, word, voice, int(rng.integers(4)), args.sample_rate)
        room = length - len(speech) - 2 * round(_MARGIN_S * args.sample_rate)
        if room < 0:
            raise ValueError(
                f"--duration {args.duration} is too short for {word!r} ({speaker}); use 1.5 or more"
            )
        start = round(_MARGIN_S * args.sample_rate) + int(rng.integers(room + 1))
        audio = sound.noise_floor(rng, length)  # [S]
        sound.mix(audio, speech * rng.uniform(0.5, 0.9), start)
        meta = {
            "word": word,
            "voice": speaker,
            "prompt": prompt if voice == "asterisk" else None,
            "speech_onset": round(start / args.sample_rate, 6),
            "speech_offset": round((start + len(speech)) / args.sample_rate, 6),
            "sample_rate": args.sample_rate,
            "duration": length / args.sample_rate,
        }
        caption = f"a voice says {word}"
        yield Item(f"audio_{index:06d}", sound.flac_bytes(audio, args.sample_rate), "flac", caption, meta)


TASK = Task(
    audio_items,
    "a spoken number or NATO-alphabet word, recorded (Asterisk) or synthesized (flite) (--voice)",
    {
        "tiny": {"n": 64, "duration": 1.5, "sample_rate": 16_000},
        "full": {"n": 2_000, "duration": 1.5, "sample_rate": 16_000},
    },
)
