"""What an install ships: requirements.txt (ComfyUI's Python) matches pyproject's dependencies, and every
file pyproject names exists."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~ \[]", line, 1)[0].lower()
            out[name] = line.replace(" ", "")
    return out


def test_requirements_txt_is_pyproject_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"])
    declared.pop("torch")
    assert _names((ROOT / "requirements.txt").read_text().splitlines()) == declared


def test_files_named_by_pyproject_exist():
    text = (ROOT / "pyproject.toml").read_text()
    data = tomllib.loads(text)
    for package, patterns in data["tool"]["setuptools"]["package-data"].items():
        base = ROOT / Path(*package.split(".")[1:])
        for pattern in patterns:
            assert list(base.glob(pattern)), f"{package}: {pattern} matches no file"
    icon = data["tool"]["comfy"]["Icon"].split("/main/", 1)[1]
    assert (ROOT / icon).is_file()
