"""The README's main command, run for real: a new virtual environment, the clone installed exactly as the
README says, ``shitu demo`` with the smallest budget, and its outputs checked.

Slow (it installs every dependency and trains a model); CI runs it after the default suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_main_command() -> str:
    """The first shell block of the README's "Two commands" section: the install-and-demo command."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)[0].strip()


def test_readme_main_command_is_install_then_demo():
    command = readme_main_command()
    assert "pip install ." in command and command.endswith("shitu demo")


@pytest.mark.slow
def test_fresh_install_runs_the_demo(tmp_path):
    if shutil.which("python3.11") is None:
        pytest.skip("python3.11 is not on PATH")
    clone = tmp_path / "clone"
    if (REPO / ".git").is_dir():
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        # the working tree may hold changes not yet committed: test what is on disk
        changed = subprocess.run(
            ["git", "ls-files", "--modified", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        for name in changed:
            source = REPO / name
            if source.is_file():
                (clone / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, clone / name)
    else:
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".venv*", ".work", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["SHITU_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        ["bash", "-c", readme_main_command() + " --json"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout.strip().splitlines()[-1])
    out = clone / "shitu-demo"
    assert Path(document["output"]) == out
    for name in ("report.html", "demo_result.json", "train/train_result.json", "train/best_model/shitu_model.json",
                 "index/index.json", "check/check_dataset_result.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "demo_result.json").read_text()) == document
    stages = ("check", "evaluate untrained", "evaluate starting weights", "train", "evaluate trained", "index")
    for stage in (*stages, "search"):
        assert document["seconds"][stage] >= 0
    for key in ("recall1", "recall5", "mAP"):
        for measured in ("metrics_before", "metrics_start", "metrics_after"):
            assert 0.0 <= document[measured][key] <= 1.0
    assert document["metrics_after"]["recall5"] >= document["metrics_after"]["recall1"]
    # random weights are near chance (1 in 20); the starting weights and the fine-tuned model are far above it
    assert document["metrics_before"]["recall1"] < 0.3
    assert document["metrics_after"]["recall1"] > document["metrics_before"]["recall1"] + 0.15
    assert len(document["search"]) == 60 and all(len(item["hits"]) == 5 for item in document["search"])
    right = sum(item["predicted_label"] == item["label"] for item in document["search"])
    assert document["search_accuracy"] == right / 60
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # self-contained: opens without a network
    assert html.count("data:image/jpeg;base64,") >= 6 * 12  # 12 query photos shown, each with 5 matches
    print(f"\ndemo: {sum(document['seconds'].values()):.0f} s; recall1 {document['metrics_before']['recall1']:.3f} "
          f"→ {document['metrics_after']['recall1']:.3f}", file=sys.stderr)  # fmt: skip
