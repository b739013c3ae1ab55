"""Issue 14 / issue 20 item 5: where the mesh's CPU seconds go per training step, per process.

    .venv/bin/python bench/cpu_per_process.py [--only mesh trl] [--num-steps 30] [--skip-steps 5]
        [--cpus 14,15] [--mesh-flags ...] [--out bench/results/cpu_per_process.json]

Wall clocks on a shared 2-core box say more about the neighbours than about the code; CPU
seconds (user + system, from /proc/<pid>/stat) mostly do not. This runs `slipstream train` with
`bench/learn_vs_trl.py`'s shared settings (its warm start, 64 prompts x 8 samples, 8 new tokens,
lr 3e-4) and reads every process of the mesh (the launcher, Redis, the reward service, the
coordinator, each rollout server, the trainer; live descendants and reaped children included)
each time a metrics row appears. Per process it reports CPU seconds per step over steps
`--skip-steps`..`--num-steps` (start-up and the first compiles left out), and per thread name
(`/proc/<pid>/task/*/comm`: Python threads, OpenMP workers, gRPC pollers) where they go. The
same figure for TRL's `GRPOTrainer` (one process, `learn_vs_trl.py`'s child) is its process's
user + system seconds per step.

On a quiet 2-core box a step cannot take less than (the mesh's CPU seconds per step) / 2, and no
less than the trainer's own per-step CPU at one thread: the table says which bound binds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learn_vs_trl as lvt  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str, task: str = "") -> list[str] | None:
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # comm may hold spaces or parentheses: the fields start after the last ')'
    return [text[text.index("(") + 1 : text.rindex(")")], *text[text.rindex(")") + 2 :].split()]


def _cpu(fields: list[str], reaped: bool) -> float:
    # fields[0] is comm, then state (field 3 of stat) onwards: utime/stime are stat fields 14/15,
    # cutime/cstime 16/17 (children already waited for).
    ticks = int(fields[12]) + int(fields[13]) + (int(fields[14]) + int(fields[15]) if reaped else 0)
    return ticks / TICK


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(entry)
            if f:
                kids[int(f[2])].append(int(entry))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def snapshot(roots: dict[str, int]) -> dict[str, dict]:
    """Cumulative CPU seconds of each named process (its tree), and per thread name within it."""
    kids = _children()
    named = set(roots.values())
    out = {}
    for name, root in roots.items():
        total, threads = 0.0, defaultdict(float)
        # A named process's subtree, minus other named processes (the launcher's children are services).
        for pid in _tree(root, {p: [c for c in cs if c not in named] for p, cs in kids.items()}):
            f = _stat(pid)
            if not f:
                continue
            total += _cpu(f, reaped=True)
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                t = _stat(pid, tid)
                if t:
                    threads[t[0]] += _cpu(t, reaped=False)
        out[name] = {"cpu_s": total, "threads": dict(threads)}
    return out


def _diff(a: dict, b: dict, steps: int) -> dict:
    """Per-step CPU seconds between two snapshots, per process and per thread name."""
    out = {}
    for name in b:
        if name not in a:
            continue
        th = {
            t: round((v - a[name]["threads"].get(t, 0.0)) / steps, 4)
            for t, v in b[name]["threads"].items()
            if v - a[name]["threads"].get(t, 0.0) > 0
        }
        out[name] = {
            "cpu_s_per_step": round((b[name]["cpu_s"] - a[name]["cpu_s"]) / steps, 4),
            "threads": dict(sorted(th.items(), key=lambda kv: -kv[1])),
        }
    return out


def idle_rates(roots: dict[str, int], seconds: float) -> dict[str, float]:
    """Cores each process burns with nothing to do: the trainer stopped (SIGSTOP) until the
    rollout has filled the staleness window and every queue drained, then `seconds` measured."""
    trainer = roots["trainer"]
    os.kill(trainer, signal.SIGSTOP)
    try:
        time.sleep(max(3.0, seconds / 2))  # what was in flight finishes
        a = snapshot(roots)
        time.sleep(seconds)
        b = snapshot(roots)
    finally:
        os.kill(trainer, signal.SIGCONT)
    return {n: round((b[n]["cpu_s"] - a[n]["cpu_s"]) / seconds, 4) for n in b if n in a and n != "trainer"}


def run_mesh(args, name: str, extra: list[str]) -> dict:
    run_dir = args.runs_dir / f"cpu-{name}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    argv = lvt.mesh_argv(args, extra, args.seed, run_dir)
    log = open(run_dir.parent / f"cpu-{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=lvt.ROOT)
    metrics, pids_file = run_dir / "metrics.jsonl", run_dir / "pids.json"
    offset, snaps, rows, idle = 0, {}, [], None
    try:
        while proc.poll() is None:
            roots = {"launcher": proc.pid}
            if pids_file.exists():
                try:
                    roots.update(json.loads(pids_file.read_text()))
                except ValueError:
                    pass  # being written
            new, offset = lvt_rows(metrics, offset)
            if new:
                snap = snapshot(roots)  # as soon as a row appears: the step just ended
                for r in new:
                    rows.append(r)
                    snaps[r["step"]] = snap
                if idle is None and args.idle_probe and rows[-1]["step"] >= args.num_steps - 2:
                    idle = idle_rates(roots, args.idle_probe)
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: slipstream train exited {proc.returncode}; see {log.name}")
    lo, hi = args.skip_steps, min(max(snaps), args.num_steps - 2)  # the steps before the idle probe
    per = _diff(snaps[lo], snaps[hi], hi - lo)
    wall = (
        next(r for r in rows if r["step"] == hi)["elapsed_s"]
        - next(r for r in rows if r["step"] == lo)["elapsed_s"]
    ) / (hi - lo)
    for name, v in per.items():
        if idle and name in idle:
            # What a step costs beyond the process's idle burn (which scales with the wall clock).
            v["idle_cores"] = idle[name]
            v["work_cpu_s_per_step"] = round(v["cpu_s_per_step"] - idle[name] * wall, 4)
    window = [r for r in rows if lo < r["step"] <= hi]
    trainer = {
        k: round(statistics.mean(r[k] for r in window), 4)
        for k in ("wait_data_s", "compute_s", "push_weights_s")
        if all(k in r for r in window)
    }
    return {
        "side": "mesh",
        "argv": argv[2:],
        "steps": [lo, hi],
        "per_process": per,
        "total_cpu_s_per_step": round(sum(p["cpu_s_per_step"] for p in per.values()), 4),
        "trainer_wall_s_per_step": trainer,
        "wall_s_per_step": round(wall, 4),
        "idle_probe_s": args.idle_probe,
        "load": os.getloadavg(),
    }


def lvt_rows(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with path.open() as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind("\n") + 1]
    return [json.loads(x) for x in complete.splitlines() if x.strip()], offset + len(complete)


def run_trl(args) -> dict:
    run_dir = args.runs_dir / "cpu-trl"
    r = lvt.run_trl(args, "trl", args.trl_args, args.seed, run_dir)
    curve = {p["step"]: p for p in r["curve"]}
    lo, hi = args.skip_steps, max(curve)
    return {
        "side": "trl",
        "steps": [lo, hi],
        "total_cpu_s_per_step": round((curve[hi]["cpu_s"] - curve[lo]["cpu_s"]) / (hi - lo), 4),
        "wall_s_per_step": round((curve[hi]["train_s"] - curve[lo]["train_s"]) / (hi - lo), 4),
        "torch_threads": r["settings"]["torch_threads"],
        "load": os.getloadavg(),
    }


def run_parts(args) -> dict:
    """The same engine, reward rule and trainer called one after another in this process,
    --parts-threads torch threads (1: what each mesh process has under --torch-threads 1; 2: the
    whole 2-core box, as one process would take it): generate the step's 64 x 8, score, train, copy
    the weights in. No gRPC, protobuf, Redis or asyncio: the figure the mesh is held against (issue
    20 item 5: the mesh keeps >= 90% of its speed), in CPU seconds and in wall-clock seconds."""
    import torch

    from slipstream.algorithms.staleness import apply_staleness_policy
    from slipstream.config import parse_config
    from slipstream.data import load_prompts
    from slipstream.models.hf import load_model, load_tokenizer
    from slipstream.services.coordinator.prompts import Prompts, sample_seed, tokenize_prompts
    from slipstream.services.reward.rules import RULES, warm_up
    from slipstream.services.rollout.engine.request import Request
    from slipstream.services.rollout.samples import eos_token_ids
    from slipstream.services.rollout.server import build_engine
    from slipstream.services.rollout.settings import EngineConfig
    from slipstream.services.trainer.actor import Actor
    from slipstream.services.trainer.loop import _scores
    from slipstream.types import Sample, Status

    torch.set_num_threads(args.parts_threads)
    run_dir = args.runs_dir / "cpu-parts"
    cfg = parse_config(lvt.mesh_argv(args, [], args.seed, run_dir)[4:])
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.hf_checkpoint)
    records = load_prompts(
        cfg.data.prompt_data, cfg.data.input_key, cfg.data.label_key, cfg.data.metadata_key
    )
    tokens = tokenize_prompts(tokenizer, records, cfg.data, cfg.rollout.rollout_max_prompt_len)
    cursor = Prompts(records, tokens, shuffle=cfg.data.rollout_shuffle, seed=cfg.train.seed).cursor(0)
    token_of = {id(r): t for r, t in zip(records, tokens, strict=True)}
    engine_cfg = EngineConfig.from_sections(
        cfg.model, cfg.rollout, cfg.infra, cuda_available=False, train=cfg.train
    )
    model = load_model(engine_cfg.model_path, device=engine_cfg.device, dtype=engine_cfg.torch_dtype)
    engine = build_engine(engine_cfg, model, eos_token_ids(model.config, tokenizer))
    actor = Actor.from_config(cfg)
    rule, r = RULES[cfg.reward.rm_type], cfg.rollout
    warm_up()
    n, clock = r.n_samples_per_prompt, time.process_time
    finished = {"stop": Status.COMPLETED, "length": Status.TRUNCATED}
    rows, walls = [], []
    for step in range(1, args.num_steps + 1):
        walls.append(time.perf_counter())
        t = [clock()]
        prompts = [cursor.next() for _ in range(r.rollout_batch_size)]
        reqs = [
            Request(
                f"p{i}/{j}", list(token_of[id(rec)]), r.rollout_max_response_len,
                temperature=r.rollout_temperature, seed=sample_seed(cfg.train.seed, f"p{i}/{j}"),
            )
            for i, rec in prompts
            for j in range(n)
        ]  # fmt: skip
        results = engine.generate(reqs)
        t.append(clock())
        samples = list(zip(reqs, results, strict=True))
        groups = []
        for g, (_, rec) in enumerate(prompts):
            group = []
            for req, res in samples[g * n : (g + 1) * n]:
                response = tokenizer.decode(res.tokens, skip_special_tokens=True)
                group.append(
                    Sample(
                        prompt=rec.prompt, tokens=req.tokens + res.tokens, response=response,
                        response_length=len(res.tokens), label=rec.label,
                        reward=rule(response, rec.label), status=finished[res.finish_reason],
                        loss_mask=[1] * len(res.tokens), rollout_log_probs=res.log_probs,
                        policy_versions=res.versions,
                    )
                )  # fmt: skip
            groups.append(group)
        t.append(clock())
        scores = [x for g in _scores(groups, cfg.algo) for x in g]
        trained, _ = apply_staleness_policy(
            [x for g in groups for x in g], step - 1, max_staleness=cfg.rollout.max_staleness,
            policy=cfg.algo.stale_sample_policy,
        )  # fmt: skip
        actor.train_rollout(trained, scores, step - 1)
        t.append(clock())
        engine.load_weights(actor.state_dict_for_sync(), version=step)
        t.append(clock())
        rows.append([b - a for a, b in zip(t, t[1:], strict=False)])
        print(f"parts step {step}: " + " ".join(f"{x:.3f}" for x in rows[-1]), flush=True)
    walls.append(time.perf_counter())
    window = rows[args.skip_steps :]
    parts = {
        k: round(statistics.mean(row[i] for row in window), 4)
        for i, k in enumerate(("generate", "reward", "train", "weights"))
    }
    return {
        "side": "parts",
        "steps": [args.skip_steps, args.num_steps],
        "parts_cpu_s_per_step": parts,
        "total_cpu_s_per_step": round(sum(parts.values()), 4),
        "wall_s_per_step": round((walls[-1] - walls[args.skip_steps]) / len(window), 4),
        "torch_threads": args.parts_threads,
        "load": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", nargs="*", default=["mesh", "trl"], help=f"trl, parts, {', '.join(lvt.VARIANTS)}"
    )
    p.add_argument("--num-steps", type=int, default=30)
    p.add_argument(
        "--skip-steps", type=int, default=5, help="Steps left out at the start (start-up, compiles)."
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rollout-batch-size", type=int, default=64)
    p.add_argument("--n-samples-per-prompt", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--adam-beta2", type=float, default=0.98)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prep", type=Path, default=lvt.ROOT / "runs" / "learn" / "prep")
    p.add_argument("--prep-seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=lvt.ROOT / "runs" / "learn")
    p.add_argument("--trl-threads", type=int, default=2, help="TRL's torch threads (a 2-core box's).")
    p.add_argument(
        "--parts-threads", type=int, default=1, help="The parts' torch threads (1: a mesh process's)."
    )
    p.add_argument("--trl-args", nargs="*", default=[])
    p.add_argument(
        "--idle-probe",
        type=float,
        default=10.0,
        help="Seconds the trainer is stopped near the end to measure each process's idle CPU (0 = no probe).",
    )
    p.add_argument(
        "--cpus",
        default="",
        help="Pin the bench and every run to these cores (e.g. 14,15: a 2-core box on a big host).",
    )
    p.add_argument("--label", default="", help="Key prefix in --out (e.g. before/after a change).")
    p.add_argument(
        "--mesh-flags", nargs=argparse.REMAINDER, default=[], help="Flags for every mesh run (last)."
    )
    p.add_argument("--out", type=Path, default=lvt.ROOT / "bench" / "results" / "cpu_per_process.json")
    args = p.parse_args(argv)
    bad = [n for n in args.only if n not in ("trl", "parts") and n not in lvt.VARIANTS]
    if bad:
        p.error(f"--only {bad[0]}: not a variant (trl, parts, {', '.join(lvt.VARIANTS)})")
    if args.skip_steps < 1 or args.num_steps < args.skip_steps + 3:
        p.error(
            "need --skip-steps >= 1 and --num-steps >= --skip-steps + 3 (the last two steps hold the idle probe)"
        )
    if args.cpus:  # inherited by every process the runs start
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    # What learn_vs_trl's helpers read: no checkpoints to score, no pinning.
    args.eval_every, args.trl_micro_batch_size, args.cpus_per_run = 10**6, 0, 0
    lvt.prepare(args.prep, args.prep_seed)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("runs", {})
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    for name in args.only:
        key = f"{args.label}{name}"
        if name in ("trl", "parts"):
            r = run_trl(args) if name == "trl" else run_parts(args)
        else:
            r = run_mesh(args, name, lvt.VARIANTS[name])
        r["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        results["runs"][key] = r
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        wall = f" (wall {r['wall_s_per_step']:.3f} s/step)" if r["wall_s_per_step"] else ""
        print(f"{key}: {r['total_cpu_s_per_step']:.3f} CPU s/step{wall} {r.get('parts_cpu_s_per_step', '')}")
        for proc, v in sorted(r.get("per_process", {}).items(), key=lambda kv: -kv[1]["cpu_s_per_step"]):
            top = ", ".join(f"{t} {s:.3f}" for t, s in list(v["threads"].items())[:4])
            idle = (
                f"  idle {v['idle_cores']:.3f} cores, work {v['work_cpu_s_per_step']:.3f}"
                if "idle_cores" in v
                else ""
            )
            print(f"  {proc:12s} {v['cpu_s_per_step']:.3f}{idle}   ({top})")
    parts = results["runs"].get(f"{args.label}parts") if "parts" in args.only else None
    for name in (n for n in args.only if n not in ("trl", "parts")):
        mesh = results["runs"].get(f"{args.label}{name}")
        if parts and mesh:  # issue 20 item 5: the mesh keeps >= 90% of its parts' speed
            share = parts["total_cpu_s_per_step"] / mesh["total_cpu_s_per_step"]
            mesh["parts_share"] = round(share, 4)
            mesh["parts_wall_share"] = round(parts["wall_s_per_step"] / mesh["wall_s_per_step"], 4)
            print(
                f"{args.label}{name}: {share:.1%} of the parts' speed in CPU s a step (parts / mesh), "
                f"{mesh['parts_wall_share']:.1%} in wall-clock s a step"
            )
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
