"""Packaging: one import root, every package folder listed, entry points answer --help fast."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {"src/slipstream": "slipstream", "services": "slipstream.services", "buffer": "slipstream.buffer"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "add these packages to [tool.setuptools] packages"
    assert listed - found == set(), "these listed packages have no folder"


def test_no_bare_top_level_services_or_buffer():
    import slipstream.buffer
    import slipstream.services

    assert Path(slipstream.services.__file__).parent == ROOT / "services"
    assert Path(slipstream.buffer.__file__).parent == ROOT / "buffer"


@pytest.mark.parametrize(
    "command", [["train"], ["demo"], ["coordinator"], ["rollout"], ["reward"], ["trainer"]]
)
def test_entry_points_answer_help(command):
    proc = subprocess.run(
        [sys.executable, "-m", "slipstream", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--rollout-batch-size" in proc.stdout


def test_core_never_imports_a_service():
    offenders = []
    for path in (ROOT / "src" / "slipstream").rglob("*.py"):
        if path.name == "cli.py":  # dispatches to service entry points by name, lazily
            continue
        if path.parent.name == "demo":  # an application on top, like cli.py: its warm start runs
            continue  # the trainer's SFT (services/trainer/sft.py), imported inside the function
        text = path.read_text()
        if "from slipstream.services" in text or "import slipstream.services" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_services_never_import_each_other():
    offenders = []
    for service in ("coordinator", "rollout", "reward", "trainer"):
        for path in (ROOT / "services" / service).rglob("*.py"):
            text = path.read_text()
            for other in {"coordinator", "rollout", "reward", "trainer"} - {service}:
                if (
                    f"from slipstream.services.{other}" in text
                    or f"import slipstream.services.{other}" in text
                ):
                    offenders.append(f"{path.relative_to(ROOT)} imports {other}")
    assert offenders == []
