"""tools/gpu_check.py in its reduced CPU mode, so that the GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_reduced_on_the_cpu_and_reports_every_column(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--reduced", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["presets"]["tiny"]
    for name in ("vanilla", "self_flow"):
        row = rows[name]
        assert row["seconds_per_step"] > 0 and row["tokens_per_s"] > 0 and row["tflops"] > 0
        assert row["flops_per_step"] > 0 and row["mfu"] is None  # no bf16 peak for a CPU
        assert any("attention" in k for k in row["attention_kernels"]), row["attention_kernels"]
    assert rows["self_flow"]["flops_per_step"] > rows["vanilla"]["flops_per_step"]  # + teacher, projector
    assert rows["self_flow_over_vanilla"] > 0 and rows["packed_over_unpacked"] > 0
    assert rows["self_flow_packed"]["flops_per_step"] == rows["self_flow"]["flops_per_step"]
    assert "| tiny | self_flow / vanilla |" in done.stdout


def test_latent_presets_get_config_only_stand_ins_for_folders_this_machine_lacks(tmp_path):
    """base / 4b name codec and text encoder folders users have; without them the check still builds
    the transformer's inputs: config.json-only autoencoders of the named classes, byte captions."""
    from selfflow.configs import load_config
    from selfflow.configs.factory import build_media_tokenizer
    from selfflow.tools.gpu_check import stand_ins

    over = stand_ins("base", tmp_path)
    assert over[-1] == "text.tokenizer=byte" and len(over) == 4
    cfg = load_config("base", over)
    media = build_media_tokenizer(cfg)  # every codec checked against the spec, no weights needed
    assert {m: media.codec(m).latent_channels for m in ("image", "video", "audio")} == {
        "image": 16, "video": 16, "audio": 64
    }  # fmt: skip
    assert stand_ins("tiny", tmp_path) == []
