"""Every command's `--help` starts without torch (or any other heavy library), and the light copies of
names that help texts show stay equal to the heavy modules they mirror."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    "training/main.py",
    "inference/sample_av.py",
    "inference/sample_image.py",
    "inference/sample_video.py",
    "tools/make_shards.py",
    "tools/make_benchmark.py",
    "tools/evaluate.py",
    "tools/benchmark.py",
    "tools/export_snapshot.py",
    "tools/train_codec.py",
    "tools/train_text_tokenizer.py",
    "tools/model_info.py",
    "tools/plot_metrics.py",
)
HEAVY = ("torch", "accelerate", "diffusers", "transformers", "deepspeed", "matplotlib", "webdataset", "cv2")

PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
out = io.StringIO()
code = None
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "help": out.getvalue(), "loaded": [m for m in HEAVY if m in sys.modules]}))
"""


@pytest.mark.parametrize("script", COMMANDS)
def test_help_starts_without_heavy_imports(script):
    probe = f"HEAVY = {HEAVY!r}\n" + PROBE
    done = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None) and "usage:" in result["help"]
    assert result["loaded"] == [], f"{script} --help imported {result['loaded']}"


SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

ENTRY_PROBE = """
import contextlib, importlib, io, json, sys
module, _, func = sys.argv[2].partition(":")
sys.argv = [sys.argv[1], "--help"]
out = io.StringIO()
code = None
try:
    with contextlib.redirect_stdout(out):
        code = getattr(importlib.import_module(module), func)()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "help": out.getvalue(), "loaded": [m for m in HEAVY if m in sys.modules]}))
"""


def test_every_command_has_a_console_script():
    targets = {f"selfflow.{script.removesuffix('.py').replace('/', '.')}:main" for script in COMMANDS}
    assert set(SCRIPTS.values()) == targets
    assert all(name.startswith("selfflow-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_starts_without_heavy_imports(name):
    """What the installed `name` runs (pyproject [project.scripts]; no reinstall needed to test it)."""
    probe = f"HEAVY = {HEAVY!r}\n" + ENTRY_PROBE
    done = subprocess.run(
        [sys.executable, "-c", probe, name, SCRIPTS[name]], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None) and "usage:" in result["help"]
    assert result["loaded"] == [], f"{name} --help imported {result['loaded']}"


def test_light_name_lists_match_the_modules_they_mirror():
    from selfflow.inference.cli import SAMPLER_NAMES
    from selfflow.inference.samplers import SAMPLERS
    from selfflow.inference.snapshot import DTYPES
    from selfflow.metrics.protocol import EVAL_TASKS
    from selfflow.metrics.suite import MODALITIES
    from selfflow.tools.export_snapshot import DTYPE_NAMES

    assert tuple(SAMPLERS) == SAMPLER_NAMES
    assert set(DTYPES) == set(DTYPE_NAMES)
    assert set(MODALITIES) == set(EVAL_TASKS)
