"""Peak memory of fit() and to_inference_data() on a big logistic regression, against the budget.

Each case runs in its own subprocess; its peak resident memory (VmHWM, as the kernel counts it,
Python and torch included) is read from /proc after fit() and, reset in between, after the
export (1000 draws, without the log_likelihood and posterior_predictive groups, which are
draws x N outputs), and on CUDA also torch.cuda.max_memory_allocated. The model is logistic
regression with D weights written the vectorized way, ``(X * w).sum(-1)``; the data X (N x D,
float32) is part of the peak. README "Memory: bounded by a budget" has the table.

    OMP_NUM_THREADS=1 python -m benchmarks.memory                  # N = 1e4, 1e5, 1e6
    python -m benchmarks.memory --sizes 10000 --steps 5 --budget 268435456
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

GIB = 2**30


def _case(
    n: int, d: int, steps: int, budget: int | None, device: str, export: bool, balance: int
) -> dict:
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_mogflow import fit, to_inference_data

    torch.manual_seed(0)
    x = torch.randn(n, d, device=device)
    w_true = torch.randn(d, device=device)
    y = torch.bernoulli(torch.sigmoid(x @ w_true))

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, device=x.device), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)

    start = time.perf_counter()
    guide = fit(
        model,
        x,
        y,
        num_steps=steps,
        progress=False,
        memory_budget=budget,
        balance_particles=balance,
    ).guide
    out = {"fit_s": time.perf_counter() - start, "fit_peak": _peak(device)}
    if export:
        _reset_peak(device)
        start = time.perf_counter()
        to_inference_data(
            guide,
            model,
            model_args=(x, y),
            num_samples=1000,
            seed=0,
            posterior_predictive=False,
            log_likelihood=False,
            memory_budget=budget,
        )
        out.update(export_s=time.perf_counter() - start, export_peak=_peak(device))
    return out


def _reset_peak(device: str) -> None:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    import torch

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> dict:
    import torch

    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    out = {"rss": hwm}
    if device.startswith("cuda"):
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def _run(n, d, steps, budget, device, export, balance, timeout) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--case",
        json.dumps([n, d, steps, budget, device, export, balance]),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _gb(value) -> str:
    return f"{value / GIB:.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget", type=int, default=GIB)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--balance-particles",
        type=int,
        default=256,
        help="fit()'s balance_particles (draws per component of the final weight balancing)",
    )
    p.add_argument(
        "--unchunked-up-to",
        type=int,
        default=10_000,
        help="also run memory_budget=None for N up to this (it needs K*N*D floats)",
    )
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(*json.loads(args.case))))
        return
    print(
        f"# memory.py  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}"
        f"  device={args.device}  D={args.dim}  steps={args.steps}  budget={_gb(args.budget)} GiB"
        f"  balance_particles={args.balance_particles}"
        f"  threads={torch_threads()}"
    )
    print(
        "| N | budget GiB | fit peak RSS GiB | fit s | export peak RSS GiB | export s |"
        " unchunked fit peak GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        bp = args.balance_particles
        r = _run(n, args.dim, args.steps, args.budget, args.device, True, bp, args.timeout)
        if n <= args.unchunked_up_to:
            u = _run(n, args.dim, args.steps, None, args.device, False, bp, args.timeout)
            unchunked = u.get("error") or _gb(u["fit_peak"]["rss"])
        else:
            unchunked = "not run"
        if "error" in r:
            print(f"| {n} | {_gb(args.budget)} | {r['error']} | | | | {unchunked} |")
            continue
        cuda = f" (cuda {_gb(r['fit_peak']['cuda'])})" if "cuda" in r["fit_peak"] else ""
        print(
            f"| {n} | {_gb(args.budget)} | {_gb(r['fit_peak']['rss'])}{cuda} | "
            f"{r['fit_s']:.1f} | {_gb(r['export_peak']['rss'])} | {r['export_s']:.1f} | "
            f"{unchunked} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
