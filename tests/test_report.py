"""The run report (`slipstream report RUN_DIR`): which plots it draws from which metrics rows, and
what the page looks like in a real browser (headless Chromium, screenshot checked not blank)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slipstream import cli
from slipstream.report import read_rows, report_at_end, write_report

CORE = {"reward_accuracy.png", "staleness.png", "tokens_per_s.png", "logprob_mismatch.png"}


def trainer_row(step: int, *, tis: bool = True, evals: bool = False) -> dict:
    """A metrics.jsonl row with the columns services/trainer/loop.py writes (values made up)."""
    row = {
        "step": step,
        "policy_version": step,
        "trained_version": step - 1,
        "reward_mean": 0.3 + 0.4 * (1 - math.exp(-step / 8)),
        "accuracy": 0.25 + 0.4 * (1 - math.exp(-step / 8)),
        "staleness_mean": 0.6,
        "staleness_max": 2,
        "staleness_hist": {"0": 20, "1": 8 + step % 3, "2": step % 4},
        "logprob_abs_diff_mean": 0.01 + 0.002 * (step % 5),
        "logprob_abs_diff_max": 0.2 + 0.03 * (step % 7),
        "loss": 0.1,
        "tis_mean": 0.98 + 0.01 * (step % 3) if tis else None,
        "tokens_per_s": 900.0 + 30 * (step % 6),
        "push_weights_s": 0.4 + 0.05 * (step % 4) if step % 2 == 0 else 0.0,
        "num_failed": int(step % 5 == 0),
        "coord_num_reward_failures": step // 5,
        "elapsed_s": 2.5 * step,
    }
    if tis:
        row["tis_max"] = 1.6 + 0.1 * (step % 4)
    if evals and step % 5 == 0:
        row["eval/gsm8k/accuracy"] = 0.2 + step / 100
        row["eval/gsm8k/reward_mean"] = 0.25 + step / 100
    return row


def make_run(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_report_draws_each_plot_whose_metrics_exist_and_names_the_absent(tmp_path):
    run = make_run(tmp_path / "run", [trainer_row(s, tis=False, evals=True) for s in range(1, 31)])
    index = write_report(run)
    assert index == run / "report" / "index.html"
    pngs = {p.name for p in index.parent.glob("*.png")}
    assert pngs == CORE | {"weight_sync.png", "reward_failures.png", "eval_gsm8k.png"}
    for name in pngs:
        assert (index.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = index.read_text()
    assert page.count("<img ") == len(pngs)  # embedded, so the page stands alone
    assert 'src="data:image/png;base64,' in page and 'src="reward_accuracy.png"' not in page
    not_plotted = page.split("Not plotted", 1)[1]
    assert "Importance-sampling weights: no values for tis_mean" in not_plotted
    assert "Eval: gsm8k" not in not_plotted


def test_report_survives_a_cut_off_last_line_and_a_run_without_steps(tmp_path):
    run = make_run(tmp_path / "cut", [trainer_row(1), trainer_row(2)], tail='{"step": 3, "rew')
    rows, num_bad = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and num_bad == 1
    page = write_report(run).read_text()
    assert "1 unreadable line(s)" in page and "is_weights.png" in page

    empty = make_run(tmp_path / "empty", [])
    page = write_report(empty).read_text()
    assert "no training step yet" in page and "<img " not in page


def test_report_at_end_never_raises(tmp_path):
    lines: list[str] = []
    assert report_at_end(tmp_path / "missing", lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("report: not written (FileNotFoundError")


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", [trainer_row(s) for s in range(1, 4)])
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(run)])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "index.html")
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(tmp_path / "nothing-here")])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


# ---- in a browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in the CI container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Appended to a copy of the page: once loaded, write each image's natural size into the DOM.
PROBE = """<script>window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => i.complete ? i.naturalWidth + "x" + i.naturalHeight : "0x0");
  document.body.setAttribute("data-image-sizes", sizes.join(" "));
});</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (`make test` installs Debian's chromium when apt-get works as root: "
    "scripts/ensure_chromium.sh)",
)
def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    run = make_run(tmp_path / "run", [trainer_row(s, evals=True) for s in range(1, 41)])
    index = write_report(run)
    num_images = index.read_text().count("<img ")

    probed = index.with_name("probe.html")
    probed.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    sizes = re.search(r'data-image-sizes="([^"]*)"', dom.stdout)
    assert sizes, "the page's load handler never ran"
    assert sizes.group(1).split() == ["640x340"] * num_images  # every plot decoded at its size

    shot = tmp_path / "report.png"
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", index.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = imread(shot)[..., :3]  # floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.1, "the screenshot is (nearly) one colour"
    ink = (pixels.mean(axis=2) < 0.9).mean()
    assert ink > 0.05, f"only {ink:.1%} of the screenshot is not white"
    # Plot colours (the reward line's blue) reached the screen, not just text.
    blue = (abs(pixels[..., 0] - 0x1F / 255) < 0.08) & (abs(pixels[..., 2] - 0xB4 / 255) < 0.08)
    assert blue.mean() > 0.001
