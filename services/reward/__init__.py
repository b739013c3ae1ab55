"""The reward service: scores samples in batches over gRPC (`Reward.Score`).

Where a reward comes from is chosen once, at start (`server.build_scorer`): a user function
(`--custom-rm-path`, `custom.py`), a remote reward-model endpoint (`--rm-url`, `remote.py`), or a
built-in rule (`--rm-type`, `rules.py`). A sample whose reward cannot be computed comes back
`failed` with the reason; it never crashes the service and never reads as a silent zero.
"""

from slipstream.config import ConfigError


class RewardConfigError(ConfigError):
    """A reward setting that cannot work (bad --custom-rm-path, unreachable --rm-url, ...); one line."""
