"""The wheel, installed core-only into a fresh venv: every console script starts, the shipped default
model samples an mp4 with sound from outside the repository, and a command needing a missing extra says
so in one line. Installs from PyPI (pip's cache is reused); a few minutes on a 2-core CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
INSTALL_TIMEOUT = 1200


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv (no system site packages) holding the wheel and the core dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp),
            str(ROOT),
        ],
        tmp,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp.glob("selfflow-*.whl")
    made = _run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    assert made.returncode == 0, made.stderr
    pip = [
        str(tmp / "venv/bin/python"),
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        str(ROOT / "constraints-cpu.txt"),
    ]
    done = _run([*pip, str(wheel)], tmp, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "venv/bin"


@pytest.mark.slow
def test_core_install_has_no_extras(venv: Path) -> None:
    probe = "import importlib.util as u; print([m for m in ('transformers', 'cv2', 'matplotlib', 'wandb', "
    probe += "'deepspeed', 'sentencepiece') if u.find_spec(m)])"
    done = _run([str(venv / "python"), "-c", probe], venv)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.slow
def test_every_console_script_starts(venv: Path, tmp_path: Path) -> None:
    for name in SCRIPTS:
        done = _run([str(venv / name), "--help"], tmp_path, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, f"{name}: {done.stderr[-2000:]}"


@pytest.mark.slow
def test_the_shipped_model_samples_an_mp4_with_sound(venv: Path, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    argv = [str(venv / "selfflow-sample-av"), "--prompt", "a ball bounces", "--steps", "2", "--out", "x.mp4"]
    done = _run(argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with av.open(str(tmp_path / "x.mp4")) as container:
        kinds = {s.type for s in container.streams}
        frames = sum(1 for _ in container.decode(video=0))
    assert {"video", "audio"} <= kinds and frames > 0


@pytest.mark.slow
def test_a_missing_extra_is_one_line_and_exit_2(venv: Path, tmp_path: Path) -> None:
    done = _run([str(venv / "selfflow-evaluate"), "--out", "e.json"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: selfflow-evaluate needs the metrics extra: pip install 'selfflow[metrics]'"
        " (missing: cv2, fontTools)"
    ]
    assert not (tmp_path / "e.json").exists()
