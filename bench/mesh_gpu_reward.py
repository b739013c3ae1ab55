"""bench/mesh_gpu.py's reward (slime's `--custom-rm-path` signature): the share of even token ids
in the response, the rule bench/grpo_step_gpu.py uses, so the mesh and its parts do the same work."""


def even_share(args, sample) -> float:
    response = sample.tokens[len(sample.tokens) - sample.response_length :]
    return sum(1 for t in response if t % 2 == 0) / max(len(response), 1)
