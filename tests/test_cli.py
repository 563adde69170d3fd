"""The command line's rough edges, as a new user meets them: each answer names the flag and the fix, no traceback."""

import pytest
from helpers import run_cli


def test_help_names_every_command_without_markup(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "``" not in out
    for command in ("env", "make-tiny", "plan", "generate", "bench", "serve"):
        assert f"    {command}" in out, command


def test_plan_model_that_is_not_a_folder(capsys):
    code, _, err = run_cli(capsys, "plan", "--model", "/nonexistent/glm")
    assert code == 2
    assert "argument --model: '/nonexistent/glm' is not a folder" in err
    assert "Traceback" not in err and "Repo id" not in err


def test_plan_model_folder_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plan", "--model", str(tmp_path))
    assert code == 2 and "has no config.json" in err


def test_plan_budget_without_unit_asks_for_one(capsys):
    code, _, err = run_cli(capsys, "plan", "--devices", "12", "12GiB")
    assert code == 2
    assert "argument --devices: '12' has no unit: write 12GiB" in err


@pytest.mark.parametrize("flag", ["--context", "--batch", "--prefill-chunk"])
def test_plan_counts_are_checked_by_flag_name(capsys, flag):
    code, _, err = run_cli(capsys, "plan", flag, "-5")
    assert code == 2
    assert f"argument {flag}: must be at least 1, got -5" in err
    assert "context_len" not in err and "batch_size" not in err


def test_plan_where_nothing_fits_says_so_and_why(capsys):
    code, out, _ = run_cli(capsys, "plan", "--devices", "12GiB")
    assert code == 0
    assert "0 tokens" not in out
    assert "no context fits, not even 1 token: cuda:0 needs 18.21 GiB but has 12.00 GiB" in out


def test_plan_that_fits_gives_the_longest_context(capsys):
    code, out, _ = run_cli(capsys, "plan", "--devices", "12GiB", "--quantization", "nf4")
    assert code == 0 and "longest context that fits: " in out and "no context fits" not in out


def test_device_map_suggestion_uses_the_flag_syntax(capsys, tiny_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_path), "--device-map", "30,30")
    assert code == 2
    assert "--device-map 30,30: the layers per GPU add up to 60, but the model has 6 decoder layers" in err
    assert "e.g. --device-map 3,3." in err and "[3, 3]" not in err


def test_generate_says_when_it_answers_with_the_tiny_model(capsys, monkeypatch):
    monkeypatch.delenv("GLMKIT_MODEL", raising=False)
    code, out, err = run_cli(capsys, "generate", "--max-new-tokens", "2", "--json")
    assert code == 0 and out.startswith("{")  # stdout stays clean JSON; the note goes to stderr
    assert "answering with the shipped tiny GLM-4 (4.7 M parameters" in err and "not GLM-4-9B-Chat" in err


def test_generate_with_a_model_says_nothing_about_the_tiny_one(capsys, tiny_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_path), "--max-new-tokens", "2", "--json")
    assert code == 0 and "tiny GLM-4" not in err
