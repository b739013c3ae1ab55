"""A trainer held back by the rollout side says so on the console, once, and only when it is."""

from slipstream.console import CONSOLE
from slipstream.services.trainer.rollout_bound import RolloutBoundHint


def rows(wait_s: float, steps: range, step_s: float = 0.6) -> list[dict]:
    # tokens_per_s is over the whole step (metrics.step_row): the step took tokens / tokens_per_s
    return [
        {"step": s, "wait_data_s": wait_s, "num_trained_tokens": 600, "tokens_per_s": 600 / step_s}
        for s in steps
    ]


def feed(hint: RolloutBoundHint, rs: list[dict]) -> None:
    for r in rs:
        hint(r)


def test_a_trainer_waiting_most_of_its_steps_is_told_once(caplog):
    hint = RolloutBoundHint(max_staleness=1)
    with caplog.at_level("WARNING", logger=CONSOLE):
        feed(hint, rows(8.0, range(1, 3), step_s=9.0))  # start-up: not counted
        feed(hint, rows(0.4, range(3, 12)))  # 9 steps: not a window yet
        assert not caplog.records
        feed(hint, rows(0.4, range(12, 30)))
    assert len(caplog.records) == 1
    assert "waited for samples 67% of steps 3-12" in caplog.text and "--rollout-num-servers" in caplog.text


def test_a_fed_trainer_or_a_sync_run_is_not_told(caplog):
    with caplog.at_level("WARNING", logger=CONSOLE):
        feed(RolloutBoundHint(max_staleness=1), rows(0.2, range(1, 40)))  # a third of each step
        feed(RolloutBoundHint(max_staleness=0), rows(0.5, range(1, 40)))  # --sync: waiting is the schedule
    assert not caplog.records
