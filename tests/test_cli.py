"""The command line's contract: fast help, one-line errors, JSON only on stdout, config overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from shitu import __version__

HEAVY = ("jax", "flax", "numpy", "PIL", "matplotlib", "orbax", "grain", "usearch")


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from shitu.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "check" in done.stdout and "convert" in done.stdout and "split" in done.stdout


def test_version(cli):
    result = cli("--version")
    assert result.code == 0
    assert result.stdout == f"shitu {__version__}\n"


def test_usage_error_is_one_line_exit_2(cli):
    result = cli("split", "somewhere", "--train", "x", "--gallery", "20", "--query", "10")
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--train" in lines[0] and "shitu split --help" in lines[0]
    assert result.stdout == ""


def test_unknown_command_is_one_line(cli):
    result = cli("chek")
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_override_suggests_close_key(cli, tmp_path):
    result = cli("check", "--demo", "--output", tmp_path, "-o", "CheckDataset.sample_nun=3")
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'CheckDataset.sample_nun'; did you mean 'CheckDataset.sample_num'?"
    ]
    assert not (tmp_path / "check_dataset_result.json").exists()


def test_override_changes_behaviour(cli, tmp_path):
    result = cli("check", "--demo", "--output", tmp_path, "-o", "CheckDataset.sample_num=2", "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert [len(doc["attributes"][f"{s}_sample_paths"]) for s in ("train", "gallery", "query")] == [2, 2, 2]


def test_global_output_override(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("check", "--demo", "-o", "Global.output=elsewhere", "-o", "CheckDataset.sample_num=1")
    assert result.code == 0, result.stderr
    assert (tmp_path / "elsewhere/check_dataset_result.json").is_file()


def test_split_enable_through_check_like_paddlex(cli, demo_copy, tmp_path):
    before = (demo_copy / "train.txt").read_text()
    result = cli(
        "check", demo_copy, "--output", tmp_path / "o", "--json",
        "-o", "CheckDataset.split.enable=True", "-o", "CheckDataset.split.train_percent=60",
        "-o", "CheckDataset.split.gallery_percent=20", "-o", "CheckDataset.split.query_percent=20",
    )  # fmt: skip
    assert result.code in (0, 1), result.stderr
    doc = result.json()
    assert doc["attributes"]["train_samples"] == 132  # round(220 * 0.6)
    assert (demo_copy / "train.txt.bak").read_text() == before


def test_demo_dataset_cannot_be_modified(cli, tmp_path):
    result = cli("check", "--demo", "--output", tmp_path, "-o", "CheckDataset.split.enable=True")
    assert result.code == 1
    assert "read-only" in result.stderr


def test_debug_variable_adds_traceback(tmp_path):
    env = {**os.environ, "SHITU_DEBUG": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "shitu", "check", str(tmp_path / "missing")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert "error: " in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "shitu", "check", str(tmp_path / "missing")], capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "SHITU_DEBUG"},
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_json_output_is_valid_for_pipelines(cli, tmp_path):
    result = cli("check", "--demo", "--output", tmp_path, "--json", "-o", "CheckDataset.sample_num=1")
    json.loads(result.stdout)
    assert result.stdout.count("\n") == 1
