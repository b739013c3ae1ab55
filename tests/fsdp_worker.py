"""Run by tests/test_parallel.py under torchrun (gloo, CPU): FSDP2 training steps + a checkpoint.

    python -m torch.distributed.run --nproc-per-node N tests/fsdp_worker.py MODEL_DIR OUT_DIR

Every rank trains on its slice of one fixed global batch for two AdamW steps, then the ranks
write one checkpoint together (rank 0 writes the files).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from slipstream.models.hf import load_model  # noqa: E402
from slipstream.services.trainer.checkpoint import save_checkpoint  # noqa: E402
from slipstream.services.trainer.parallel import init_parallel, shard_model, shutdown  # noqa: E402

GLOBAL_BATCH = 8


def global_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(7))


def train(model: torch.nn.Module, tokens: torch.Tensor, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
    return opt


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    par = init_parallel(torch.device("cpu"))
    model = shard_model(load_model(model_dir), par)
    tokens = global_batch(model.config.vocab_size)
    share = GLOBAL_BATCH // par.world_size
    opt = train(model, tokens[par.rank * share : (par.rank + 1) * share])
    save_checkpoint(out, 2, model, opt, {"policy_version": 2}, par=par)
    shutdown(par)


if __name__ == "__main__":
    main()
