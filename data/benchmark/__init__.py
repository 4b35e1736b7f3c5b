"""Builders of the offline multimodal benchmark, one module per task (see tools/make_benchmark.py).

  classes  T2I-class: Fashion-MNIST images captioned by class
  text     T2I-text: a word from a fixed vocabulary rendered with a packaged font
  emoji    T2I-emoji: a Noto colour emoji on a coloured background, captioned by its Unicode name
  video    T2V: a Fashion-MNIST item, digit or emoji moving in a direction or bouncing (mp4)
  avsync   T2AV: a bouncing ball with impact sounds, or a digit that appears while a voice says it (mp4)
  audio    T2A: a spoken number or NATO-alphabet word (flac)

Shared pieces: `common` (items, seeds, colours), `sprites` (fonts, emoji, sub-pixel compositing),
`sound` (speech, clicks, onsets, flac) and `media` (mp4 encode/decode with PyAV). Every builder
takes the parsed command line and yields `common.Item`s; the output depends only on the arguments.
"""
