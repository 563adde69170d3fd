"""pyproject.toml and environment.yml name the same packages; the CLI works."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted


def test_python_m_glmkit_cli_runs_and_exits_with_its_codes():
    ok = subprocess.run([sys.executable, "-m", "glmkit.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "make-tiny" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "glmkit.cli", "plan", "--context", "-5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--context: must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_env_reports_versions_and_gpus(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert "torch" in out and "transformers" in out
    assert "GPU" in out


def test_env_report_names_each_gpu_link():
    from glmkit.env import EnvReport, GpuLink, gpu_links, list_gpus

    report = EnvReport("3.11", {"torch": "x"}, links=[GpuLink(0, 1, True, "PCIe, one switch"),
                                                      GpuLink(0, 2, False, "PCIe, across CPU sockets")])
    assert ["GPU 0 - GPU 1", "NVLink"] in report.rows()
    assert ["GPU 0 - GPU 2", "PCIe, across CPU sockets"] in report.rows()
    n = len(list_gpus()[0])
    assert len(gpu_links()) == n * (n - 1) // 2  # one per pair; none (and no error) without a driver


def test_peer_copy_needs_two_gpus():
    import torch

    from glmkit.bench import peer_copy_seconds

    if torch.cuda.device_count() < 2:
        with pytest.raises(RuntimeError, match="needs two CUDA devices"):
            peer_copy_seconds(8192)
    else:
        assert peer_copy_seconds(2**20) > 0


def test_cli_make_tiny_writes_a_checkpoint(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "make-tiny", str(tmp_path / "t"))
    assert code == 0 and "tiny GLM checkpoint written to" in out
    assert (tmp_path / "t" / "model.safetensors").exists()
    assert (tmp_path / "t" / "tokenizer.json").exists()


def test_cli_reports_errors_in_words_with_exit_code_2(capsys):
    code, _, err = run_cli(capsys, "plan", "--devices", "0GiB")
    assert code == 2
    assert "must be positive" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--device-map", "3,x"], "whole numbers, like 20,20"),
    (["--device-map", "3,3", "--tp", "2"], "not both"),
    (["--device-map", "2,2"], "add up to 4, but the model has 6 decoder layers; e.g. --device-map 3,3"),
])
def test_cli_device_map_option_is_checked(args, message, capsys):
    code, _, err = run_cli(capsys, "bench", "--new-tokens", "2", *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err
