"""Prompt data and the launcher's preflight: a label-based reward without labels fails at start.

Before issue 13, a forgotten `--label-key` ran to the end with reward 0 and every sample
dead-lettered, exit 0; a label in prose that the math rule finds no answer in was never mentioned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slipstream.config import parse_config
from slipstream.data import DataError, PromptCursor, PromptRecord, load_prompts
from slipstream.launcher import LABEL_SAMPLE, LaunchError, preflight


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_require_label_names_file_line_and_flag(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "label": "2"}, {"prompt": "2+2=", "answer": "4"}])
    assert [r.label for r in load_prompts(path)] == ["2", ""]  # no reward asked for labels: accepted
    with pytest.raises(DataError) as e:
        load_prompts(path, require_label=True)
    assert str(e.value) == f"{path}:2: missing key 'label' (--label-key)"
    assert [r.label for r in load_prompts(path, label_key="answer", require_label=False)] == ["", "4"]


@pytest.mark.parametrize("value", ["", "  ", None])
def test_require_label_refuses_empty_labels(tmp_path, value):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "label": value}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: empty 'label' \(--label-key\)"):
        load_prompts(path, require_label=True)


def test_records_know_where_they_came_from(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "label": "1"}, {"prompt": "b", "label": "2"}])
    assert [r.where for r in load_prompts(path)] == [f"{path}:1", f"{path}:2"]


@pytest.fixture
def model_dir(tmp_path) -> str:
    # preflight looks for a Hugging Face directory only; it does not load the weights
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return str(d)


def _cfg(model_dir: str, data: str, *flags: str):
    return parse_config(["--hf-checkpoint", model_dir, "--prompt-data", data, *flags])


@pytest.mark.parametrize("rm_type", ["math", "exact"])
def test_preflight_fails_when_a_label_reward_has_no_labels(tmp_path, model_dir, rm_type):
    data = _jsonl(tmp_path / "p.jsonl", [{"question": "1+1=", "answer": "2"}])
    cfg = _cfg(model_dir, data, "--input-key", "question", "--rm-type", rm_type)  # --label-key forgotten
    with pytest.raises(LaunchError) as e:
        preflight(cfg)
    assert str(e.value) == f"{data}:1: missing key 'label' (--label-key)"
    preflight(_cfg(model_dir, data, "--input-key", "question", "--label-key", "answer", "--rm-type", rm_type))


def test_preflight_accepts_no_labels_for_rewards_that_may_not_need_them(tmp_path, model_dir):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "write a poem"}])
    reward = tmp_path / "rm.py"
    reward.write_text("def rm(args, sample):\n    return 1.0\n")
    preflight(_cfg(model_dir, data, "--custom-rm-path", f"{reward}:rm"))
    preflight(_cfg(model_dir, data, "--rm-type", "remote_rm", "--rm-url", "http://127.0.0.1:1/rm"))


def test_preflight_warns_when_math_finds_no_answer_in_labels(tmp_path, model_dir, capsys):
    rows = [{"prompt": f"q{i}", "label": f"The sum is {i}"} for i in range(200)]
    rows[7]["label"] = "The capital of France is Paris"
    data = _jsonl(tmp_path / "p.jsonl", rows)
    preflight(_cfg(model_dir, data))
    assert capsys.readouterr().err == ""  # prose with an answer in it is fine

    rows = [{"prompt": f"q{i}", "label": "The capital of France is Paris"} for i in range(200)]
    data = _jsonl(tmp_path / "q.jsonl", rows)
    preflight(_cfg(model_dir, data))
    err = capsys.readouterr().err
    assert (
        f"warning: --rm-type math finds no answer in {LABEL_SAMPLE} of {LABEL_SAMPLE} sampled labels" in err
    )
    assert f"{data}:" in err and "The capital of France is Paris" in err
    preflight(_cfg(model_dir, data, "--rm-type", "exact"))  # exact compares whole labels: no warning
    assert capsys.readouterr().err == ""


def test_prompt_cursor_walks_each_epoch_in_its_own_order_and_resumes_anywhere():
    records = [PromptRecord(prompt=f"p{i}", label=str(i), metadata={}, where=f"f:{i}") for i in range(7)]
    cursor = PromptCursor(records, shuffle=True, seed=3)
    walked = [cursor.next() for _ in range(3 * len(records))]
    assert [index for index, _ in walked] == list(range(3 * len(records)))
    epochs = [[r.label for _, r in walked[e * 7 : (e + 1) * 7]] for e in range(3)]
    for order in epochs:  # every record once per epoch
        assert sorted(order) == sorted(r.label for r in records)
    assert len({tuple(o) for o in epochs}) > 1  # reshuffled per epoch
    for position in (0, 5, 7, 13, 20):  # a cursor resumed at any position continues the same walk
        resumed = PromptCursor(records, shuffle=True, seed=3, position=position)
        rest = [resumed.next()[1].label for _ in range(3 * len(records) - position)]
        assert rest == [r.label for _, r in walked[position:]]
    plain = PromptCursor(records, shuffle=False, seed=3)
    assert [plain.next()[1].label for _ in range(8)] == [*(r.label for r in records), records[0].label]
