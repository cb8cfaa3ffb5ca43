"""Start-up costs: embedded Ray to its first task, and a `spear tokenize` run with nothing new.

    python bench/startup.py                    # 3 rounds, all CPUs
    python bench/startup.py --rounds 1 --cpus 2 --skip-noop

Every figure is a fresh process, timed from outside (its whole life: Python start, imports,
Ray start, first task, shutdown) and from inside (ray.init alone, and up to the first task's
result), plus the CPU seconds that the driver and all of Ray's processes used up to the first
task (steadier than wall time on a shared machine, and what start-up costs on a small one). The variants run in turn (A B C A B C ...) so a drift in the machine's speed hits all:
  (1) reference: ``ray.init(num_cpus=N)`` with Ray's defaults (dashboard, metrics, usage stats:
      what spear's embedded Ray was before these were cut);
  (2) spear's embedded Ray for data jobs (decode, tokenize): ``ray_session(dashboard=False)``;
  (3) spear's embedded Ray for training: ``ray_session(dashboard=True)`` (Ray Train needs the State API);
and each figure of (2) and (3) as a ratio to (1). Then a no-op `spear tokenize` (a tiny corpus
tokenised once beforehand, not timed) against `spear --help` (the floor of any CLI command).
Medians are printed; min and max show the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "ray-defaults": "reference: ray.init, Ray's defaults",
    "spear-data": "spear embedded Ray, data jobs",
    "spear-train": "spear embedded Ray, training",
}


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every live descendant (Ray's daemons and
    workers), from /proc: on a shared machine a steadier figure than wall time. 0 off Linux."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, cpu = {}, {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        cpu[int(pid)] = sum(int(x) for x in fields[11:15]) / ticks  # utime stime cutime cstime
    me, total = os.getpid(), 0.0
    for pid in cpu:
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += cpu[pid]
    return total


def child(variant: str, cpus: int, system_config: str | None) -> None:
    """One start-up in this process; prints a JSON line of inside timings."""
    t0 = time.monotonic()
    import ray

    t_import = time.monotonic()
    temp_dir = tempfile.mkdtemp(prefix="spear-bench-ray-")
    if variant == "ray-defaults":
        ray.init(num_cpus=cpus, _temp_dir=temp_dir, logging_level="WARNING")
        session = None
    else:
        from spear.cluster import ray_runtime
        from spear.config import RayConfig

        if system_config:
            ray_runtime.EMBEDDED_SYSTEM_CONFIG.update(json.loads(system_config))
        session = ray_runtime.ray_session(RayConfig(num_cpus=cpus, temp_dir=temp_dir),
                                          dashboard=variant == "spear-train", announce=None)
        session.__enter__()
    t_ready = time.monotonic()
    ray.get(ray.remote(lambda: 1).options(num_cpus=1).remote())
    t_first = time.monotonic()
    cpu_first = _tree_cpu_seconds()
    ray.get([ray.remote(lambda: 1).options(num_cpus=1).remote() for _ in range(cpus)])
    t_all = time.monotonic()
    if session is not None:
        session.__exit__(None, None, None)
    else:
        ray.shutdown()
    print(json.dumps({"import_s": t_import - t0, "init_s": t_ready - t_import, "first_task_s": t_first - t_import,
                      "all_cpus_s": t_all - t_import, "cpu_to_first_task_s": cpu_first}), flush=True)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str, float]:
    """(wall s, stdout, CPU s of the command and the processes it waited for)."""
    t0, c0 = time.monotonic(), _children_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r.stdout, _children_cpu() - c0


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} ({min(xs):.2f}-{max(xs):.2f})"


def startup(rounds: int, cpus: int, system_config: str | None) -> None:
    figures: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--cpus", str(cpus)]
            if system_config:
                cmd += ["--system-config", system_config]
            wall, out, _ = _timed(cmd)
            inside = json.loads(out.strip().splitlines()[-1])
            for k, val in dict(inside, process_s=wall).items():
                figures[v].setdefault(k, []).append(val)
    keys = [("init_s", "ray.init"), ("first_task_s", "to 1st task"), ("all_cpus_s", f"to {cpus} tasks"),
            ("process_s", "whole process"), ("cpu_to_first_task_s", "CPU s to 1st task")]
    print(f"\nembedded Ray start-up, {cpus} CPUs (machine has {os.cpu_count()}), {rounds} rounds; "
          f"seconds: median (min-max)")
    print(f"{'variant':40s}" + "".join(f"{name:>22s}" for _, name in keys))
    for v, label in VARIANTS.items():
        print(f"{label:40s}" + "".join(f"{_spread(figures[v][k]):>22s}" for k, _ in keys))
    ref = figures["ray-defaults"]
    for v in ("spear-data", "spear-train"):
        ratios = "  ".join(f"{name} {statistics.median(figures[v][k]) / statistics.median(ref[k]):.2f}x"
                           for k, name in keys)
        print(f"{VARIANTS[v]} / reference: {ratios}")


def noop_tokenize(rounds: int, cpus: int, cache: str) -> None:
    import common

    corpus = os.path.join(cache, "corpus")
    common.make_corpus(corpus, minutes=0.5, file_seconds=5.0)
    out = os.path.join(cache, "tokens")
    cli = [sys.executable, "-m", "spear.pipeline.cli"]
    demo_yaml = os.path.join(os.path.dirname(_HERE), "pipeline", "demo.yaml")
    cmd = cli + ["tokenize", demo_yaml, "--input", corpus, "--domain", "speech", "--output", out,
                 "--set", "mvq.speech_codebooks=4", "--set", "mvq.codebook_size=16", "--set", "mvq.sample_frames=1000",
                 "--set", f"ray.num_cpus={cpus}"]
    first = _timed(cmd)[0]  # tokenises the corpus (or finds it done from an earlier bench run)
    runs: dict[str, list[tuple[float, str, float]]] = {"noop": [], "floor": []}
    for _ in range(rounds):
        runs["noop"].append(_timed(cmd))
        runs["floor"].append(_timed(cli + ["--help"]))
    wall = {k: [r[0] for r in v] for k, v in runs.items()}
    cpu = {k: [r[2] for r in v] for k, v in runs.items()}
    print(f"\nno-op `spear tokenize` ({len(os.listdir(corpus))} objects, all committed; first run {first:.1f} s), "
          f"seconds: median (min-max)\n"
          f"{'':24s}{'wall':>22s}{'CPU':>22s}\n"
          f"{'spear tokenize (no-op)':24s}{_spread(wall['noop']):>22s}{_spread(cpu['noop']):>22s}\n"
          f"{'spear --help':24s}{_spread(wall['floor']):>22s}{_spread(cpu['floor']):>22s}\n"
          f"no-op / --help: wall {statistics.median(wall['noop']) / statistics.median(wall['floor']):.2f}x, "
          f"CPU {statistics.median(cpu['noop']) / statistics.median(cpu['floor']):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--skip-noop", action="store_true", help="only the Ray start-up figures")
    ap.add_argument("--skip-startup", action="store_true", help="only the no-op tokenize figures")
    ap.add_argument("--system-config", default=None, help="JSON merged into spear's embedded _system_config (to try options)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spear-bench-startup"))
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.cpus, args.system_config)
        return
    if not args.skip_startup:
        startup(args.rounds, args.cpus, args.system_config)
    if not args.skip_noop:
        noop_tokenize(args.rounds, args.cpus, args.cache)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
