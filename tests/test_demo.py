"""`loracuda demo`: a short run passes every check it prints, writes a PEFT adapter, and bad input is one line."""

import json
import os

import pytest

from loracuda.cli.main import main


def test_demo_short_run_passes_its_checks(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["demo", "--steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[FAILED]" not in printed
    assert printed.count("[ok]") == 4
    assert "train step, reference" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert os.path.getsize(out / "adapter_model.safetensors") > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--device", "tpu"], "unknown device"),
        (["demo", "--dtype", "int8"], "unknown dtype"),
        (["demo", "--steps", "0"], "--steps"),
    ],
)
def test_demo_bad_input_is_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
