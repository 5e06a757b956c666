"""Time and peak memory of OPD's chunked reward kernels against the naive full log-softmax implementation.

What is compared, on bf16 logits as a model would produce them (N = 1 sequence of T positions, vocabulary V):
  topk    only_stu top-k rewards + both entropies: `logit_stats` (student, then teacher at the student's ids),
          `build_support`, `compute_rewards`  vs  log_softmax(x.float()) of both models, then topk / gather / entropy.
  fullkl  exact per-position reverse KL: `full_vocab_reverse_kl`  vs  F.kl_div on both full float32 log-softmaxes.
  fullpg  full-vocabulary PG loss, forward + backward: `full_vocab_pg_loss_NT`  vs  autograd through the
          materialised float32 log-softmaxes.
  fullpg_hidden  the same loss from both models' final hidden states [T, H] and output embeddings [V, H]
          (`full_vocab_pg_loss_from_hidden`, no [T, V] logits)  vs  the head's logits materialised, then as naive
          fullpg, backward into the hidden states and the output embedding. Its peak excludes the returned
          gradients (the hidden states' and the output embedding's, which every implementation returns).
  slots_hidden  the top-k update's student side, forward + backward: log-probs at K ids per position from the
          final hidden states and output embedding (`logprobs_at` of an `OutputHead`)  vs  the head's logits
          materialised, float32 log_softmax, gather, backward. Peak as fullpg_hidden's.
Each (path, implementation, V, T, chunk) case runs in a fresh subprocess so allocations cannot leak between
cases. Peak memory on CPU is the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs once the inputs exist) minus the resident set at that moment: the extra memory the
computation needs on top of the logits it is given. On CUDA it is torch.cuda.max_memory_allocated minus the
allocation before the call. Times are one run after a small warm-up, wall clock.
The parent checks that both implementations agree (sum of the outputs) and prints a markdown table.

Achieved rate of the chunked implementation (the last two columns), against the device's copy bandwidth: before the
cases, one more subprocess (same threads) times `dst.copy_(src)` of a float32 tensor of --copy-mib MiB (default
256 on CPU, 1024 on CUDA; synchronised around each copy on CUDA), best of 5 after one untimed copy, counted as
read + write bytes (2 x size) / seconds. Each case's "achieved" figure is the bytes (or FLOPs) the computation
must at least move (or do) once, divided by its time; it is a lower bound on the traffic (the chunked kernels
read some inputs twice, e.g. fullpg recomputes the advantage in backward), not a measurement of it:
  topk, fullkl   both bf16 logits tensors read once: 2 x T x V x 2 bytes (the outputs are O(T x K), negligible).
  fullpg         both logits read once plus the gradient of the student's logits written once: 3 x T x V x 2 bytes.
  fullpg_hidden, slots_hidden  matmul-bound, not bandwidth-bound: reported as TFLOP/s, 2 x T x V x H per head
                 matmul, 4 matmuls each (fullpg_hidden: forward logits of both models + 2 backward matmuls;
                 slots_hidden: 1 forward + 1 recomputed in backward + 2 backward), so 8 x T x V x H FLOPs;
                 the "% of copy bandwidth" column is blank for them.

    python bench/bench_rewards.py                                   # CPU defaults (~5 min on 2 busy cores)
    python bench/bench_rewards.py --sizes 32768:2048,151936:2048 --chunk-sizes 256,1024   # chunk-size effect
    python bench/bench_rewards.py --device cuda --sizes 32768:8192,151936:8192 --chunk-sizes 1024
    python bench/bench_rewards.py --sizes 32768:256 --copy-mib 64                 # a quick small run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PATHS = ("topk", "fullkl", "fullpg", "fullpg_hidden", "slots_hidden")
HEAD_PATHS = ("fullpg_hidden", "slots_hidden")  # inputs: hidden states and output embeddings, not logits
HIDDEN = 1024  # Qwen3-0.6B's hidden size, for the HEAD_PATHS
DEFAULT_SIZES = "32768:8192,151936:2048"
LOGIT_BYTES = 2  # bf16 logits
HEAD_MATMULS = {"fullpg_hidden": 4, "slots_hidden": 4}  # [T, H] x [H, V]-sized matmuls per case, see the docstring


def min_bytes(path: str, V: int, T: int, element_size: int = LOGIT_BYTES) -> int | None:
    """Bytes a logits path must at least move once (None for the matmul-bound head paths)."""
    reads = 2 * T * V * element_size  # both logits tensors, once
    return {"topk": reads, "fullkl": reads, "fullpg": reads + T * V * element_size}.get(path)


def matmul_flops(path: str, V: int, T: int, H: int = HIDDEN) -> int | None:
    """FLOPs of a head path's [T, H] x [H, V] matmuls, 2 x T x V x H each (None for the logits paths)."""
    n = HEAD_MATMULS.get(path)
    return None if n is None else n * 2 * T * V * H


def copy_bandwidth(device: str, mib: float, repeats: int = 5) -> float:
    """Bytes per second of dst.copy_(src) of a float32 tensor of `mib` MiB, read + write, best of `repeats`."""
    import torch

    n = max(1, int(mib * 2**20) // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # page faults / lazy init off the clock
    cuda = device.startswith("cuda")
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(src.device)
        start = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(src.device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / max(best, 1e-12)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _make_logits(T: int, V: int, device: str, seed: int):
    """Student and teacher bf16 logits [1, T, V], filled in slices so no float32 [T, V] temporary ever exists."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.empty(1, T, V, dtype=torch.bfloat16, device=device)
    t = torch.empty_like(s)
    for i in range(0, T, 64):
        rows = min(64, T - i)
        base = torch.randn(rows, V, generator=gen, device=device) * 2.0
        s[0, i : i + rows] = base
        t[0, i : i + rows] = base + torch.randn(rows, V, generator=gen, device=device) * 1.5
    return s, t


def _make_heads(T: int, V: int, device: str, seed: int):
    """Student and teacher (hidden [1, T, H], output embedding [V, H]), logits of std about 2; bf16 on CUDA,
    float32 on CPU (CPU bf16 matmuls are emulated and two orders of magnitude slower on most hosts)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    scale = 2.0 / HIDDEN**0.5
    return (rnd(1, T, HIDDEN, scale=1.0), rnd(V, HIDDEN, scale=scale)), (
        rnd(1, T, HIDDEN, scale=1.0),
        rnd(V, HIDDEN, scale=scale),
    )


def _run_case(path: str, impl: str, V: int, T: int, k: int, chunk: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from opd.core.config import OPDConfig
    from opd.core.full_vocab import (
        OutputHead,
        full_vocab_pg_loss_from_hidden,
        full_vocab_pg_loss_NT,
        full_vocab_reverse_kl,
    )
    from opd.core.logits import logit_stats, logprobs_at
    from opd.core.rewards import compute_rewards
    from opd.core.support import build_support

    cfg = OPDConfig(top_k=k, chunk_size=chunk)

    def rewards_from(s_ids, t_ids, s_lp, t_lp_at_s):
        sup = build_support(
            "only_stu",
            student_topk_ids_NTK=s_ids,
            teacher_topk_ids_NTK=t_ids,
            student_lp_at_student_NTK=s_lp,
            teacher_lp_at_student_NTK=t_lp_at_s,
        )
        return compute_rewards(cfg, sup)

    def topk_chunked(s, t):
        st_s = logit_stats(s, k=k, chunk_size=chunk)
        st_t = logit_stats(t, k=k, ids_NTJ=st_s.topk_ids_NTK, chunk_size=chunk)
        r = rewards_from(st_s.topk_ids_NTK, st_t.topk_ids_NTK, st_s.topk_lp_NTK, st_t.lp_at_ids_NTJ)
        return r.sum() + st_s.entropy_NT.sum() + st_t.entropy_NT.sum()

    @torch.no_grad()
    def topk_naive(s, t):
        lp = torch.log_softmax(s.float(), -1)
        lq = torch.log_softmax(t.float(), -1)
        ent = -(lp.exp() * lp).sum(-1).sum() - (lq.exp() * lq).sum(-1).sum()
        s_lp, s_ids = lp.topk(k, -1)
        r = rewards_from(s_ids, lq.topk(k, -1).indices, s_lp, lq.gather(-1, s_ids))
        return r.sum() + ent

    def fullkl_chunked(s, t):
        return full_vocab_reverse_kl(s, t, chunk_size=chunk).sum()

    @torch.no_grad()
    def fullkl_naive(s, t):
        lp, lq = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1).sum()

    def fullpg_chunked(s, t):
        s = s.detach().requires_grad_(True)
        loss = full_vocab_pg_loss_NT(s, t, "student_p", chunk_size=chunk).sum()
        loss.backward()
        return loss.detach() + s.grad[0, :8].float().abs().sum()  # a slice: a full float32 copy would skew the peak

    def fullpg_naive(s, t):
        s = s.detach().requires_grad_(True)
        lp = torch.log_softmax(s.float(), -1)
        lq = torch.log_softmax(t.float(), -1)
        adv = (lp.exp() * (lq - lp)).detach()
        loss = -(adv * lp).sum(-1).sum()
        loss.backward()
        return -adv.sum() + s.grad[0, :8].float().abs().sum()

    def _student_leaves(s):
        h, w = (x.detach().requires_grad_(True) for x in s)
        return h, w

    def fullpg_hidden_chunked(s, t):
        h, w = _student_leaves(s)
        weights = torch.ones(h.shape[:-1], device=h.device)
        loss = full_vocab_pg_loss_from_hidden(OutputHead(h, w), OutputHead(*t), weights, "student_p", chunk_size=chunk)
        loss.backward()
        return loss.detach() + h.grad[0, :8].float().abs().sum()

    def fullpg_hidden_naive(s, t):
        h, w = _student_leaves(s)
        lp = torch.log_softmax(F.linear(h, w).float(), -1)
        lq = torch.log_softmax(F.linear(*t).float(), -1)
        adv = (lp.exp() * (lq - lp)).detach()
        loss = -(adv * lp).sum(-1).sum()
        loss.backward()
        return -adv.sum() + h.grad[0, :8].float().abs().sum()

    def _slot_ids_and_upstream(h, w):
        gen = torch.Generator(device=h.device).manual_seed(2)
        ids = torch.randint(0, w.shape[0], (*h.shape[:-1], k), generator=gen, device=h.device)
        return ids, torch.randn(ids.shape, generator=gen, device=h.device)

    def slots_hidden_chunked(s, t):
        h, w = _student_leaves(s)
        ids, up = _slot_ids_and_upstream(h, w)
        lp = logprobs_at(OutputHead(h, w), ids, chunk_size=chunk)
        (lp * up).sum().backward()
        return lp.detach().sum() + h.grad[0, :8].float().abs().sum()

    def slots_hidden_naive(s, t):
        h, w = _student_leaves(s)
        ids, up = _slot_ids_and_upstream(h, w)
        lp = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, ids)
        (lp * up).sum().backward()
        return lp.detach().sum() + h.grad[0, :8].float().abs().sum()

    fn = {
        ("slots_hidden", "chunked"): slots_hidden_chunked,
        ("slots_hidden", "naive"): slots_hidden_naive,
        ("fullpg_hidden", "chunked"): fullpg_hidden_chunked,
        ("fullpg_hidden", "naive"): fullpg_hidden_naive,
        ("topk", "chunked"): topk_chunked,
        ("topk", "naive"): topk_naive,
        ("fullkl", "chunked"): fullkl_chunked,
        ("fullkl", "naive"): fullkl_naive,
        ("fullpg", "chunked"): fullpg_chunked,
        ("fullpg", "naive"): fullpg_naive,
    }[(path, impl)]

    make = _make_heads if path in HEAD_PATHS else _make_logits
    warm_s, warm_t = make(4, 64, device, seed=1)
    fn(warm_s, warm_t)  # first-call overheads (kernel selection, lazy init) off the clock
    del warm_s, warm_t
    s, t = make(T, V, device, seed=0)
    # the head paths: the gradients they return (hidden states, output embedding) are not "extra"
    returned = sum(x.numel() * x.element_size() for x in s) if path in HEAD_PATHS else 0
    inputs = sum(x.numel() * x.element_size() for x in (*s, *t)) if path in HEAD_PATHS else 2 * s.numel() * 2
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
            fh.write("5")
        before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    checksum = float(fn(s, t))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - before - returned
    return {
        "seconds": seconds,
        "peak_extra_bytes": peak,
        "inputs_bytes": inputs,
        "checksum": checksum,
    }


def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _naive_estimate(path: str, V: int, T: int) -> int:
    """Bytes the naive path needs at its peak (inputs + float32 [T, V] tensors alive together), for skipping."""
    per = T * V * 4
    return 2 * T * V * 2 + {"topk": 4, "fullkl": 4, "fullpg": 6, "fullpg_hidden": 7, "slots_hidden": 4}[path] * per


def _run_child(args, flag: str, payload: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, flag, json.dumps(payload)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _subprocess(args, path, impl, V, T, chunk) -> dict:
    return _run_child(args, "--_case", [path, impl, V, T, args.k, chunk, args.device])


def _achieved(path: str, V: int, T: int, case: dict | None, copy_bps: float | None) -> tuple[str, str]:
    """The chunked case's achieved rate ("X GB/s" or "X TFLOP/s") and its % of the copy bandwidth (or blank)."""
    if not case or "error" in case:
        return "n/a", ""
    seconds = max(case["seconds"], 1e-12)
    flops = matmul_flops(path, V, T)
    if flops is not None:
        return f"{flops / seconds / 1e12:.3g} TFLOP/s", ""
    bps = min_bytes(path, V, T) / seconds
    pct = f"{100 * bps / copy_bps:.1f}%" if copy_bps else "n/a"
    return f"{bps / 1e9:.3g} GB/s", pct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated V:T pairs (default %(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)} (default: all)")
    parser.add_argument("--chunk-sizes", default="256", help="chunk sizes of the chunked path (default %(default)s)")
    parser.add_argument("--k", type=int, default=16, help="top-k width of the topk path (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case (default %(default)s)")
    parser.add_argument(
        "--max-gb",
        type=float,
        default=12.0,
        help="skip naive cases estimated above this many GB (or above 80%% of free memory on CPU)",
    )
    parser.add_argument(
        "--copy-mib",
        type=float,
        default=None,
        help="size of the float32 copy that measures the device's copy bandwidth (default 256 on CPU, 1024 on CUDA)",
    )
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    parser.add_argument("--_copy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._case:
        path, impl, V, T, k, chunk, device = json.loads(args._case)
        print(json.dumps(_run_case(path, impl, V, T, k, chunk, device)))
        return 0
    if args._copy:
        device, mib = json.loads(args._copy)
        print(json.dumps({"bytes_per_second": copy_bandwidth(device, mib)}))
        return 0

    sizes = [tuple(int(x) for x in pair.split(":")) for pair in args.sizes.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        parser.error(f"--paths: unknown {bad}; valid: {', '.join(PATHS)}")
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    gib = 1024**3
    copy_mib = args.copy_mib or (1024 if args.device.startswith("cuda") else 256)
    copy = _run_child(args, "--_copy", [args.device, copy_mib])
    copy_bps = copy.get("bytes_per_second")
    print(f"copy bandwidth measured ({copy_mib:g} MiB)", file=sys.stderr, flush=True)
    rows, skipped = [], []
    for path in paths:
        for V, T in sizes:
            budget = args.max_gb * 1e9
            if args.device == "cpu":
                budget = min(budget, 0.8 * _mem_available())
            estimate = _naive_estimate(path, V, T)
            if estimate > budget:
                naive = None
                skipped.append(
                    f"{path} V={V} T={T}: naive needs ~{estimate / gib:.1f} GiB > budget {budget / gib:.1f} GiB"
                )
            else:
                naive = _subprocess(args, path, "naive", V, T, 1024)  # chunk unused by the naive path
            for chunk in chunks:
                chunked = _subprocess(args, path, "chunked", V, T, chunk)
                rows.append((path, V, T, chunk, chunked, naive))
                print(f"done {path} V={V} T={T} chunk={chunk}", file=sys.stderr, flush=True)

    def mib(case):
        return "n/a" if not case or "error" in case else f"{case['peak_extra_bytes'] / 2**20:,.0f}"

    def sec(case):
        if not case:
            return "skipped"
        return case["error"][:40] if "error" in case else f"{case['seconds']:.2f}"

    print(
        f"\nDevice: {args.device}, threads per case: {args.threads}, K = {args.k}, N = 1, bf16 logits; "
        "peak = extra memory over the inputs (MiB)."
    )
    if copy_bps:
        print(f"device copy bandwidth: {copy_bps / 1e9:.3g} GB/s ({copy_mib:g} MiB copy, read + write)\n")
    else:
        print(f"device copy bandwidth: n/a ({copy.get('error', 'no result')})\n")
    print(
        "| path | V | T | chunk | chunked s | naive s | chunked peak MiB | naive peak MiB | naive/chunked mem | agree "
        "| achieved GB/s (or TFLOP/s) | % of copy bandwidth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path, V, T, chunk, chunked, naive in rows:
        ratio, agree = "n/a", "n/a"
        if naive and chunked and "error" not in naive and "error" not in chunked:
            ratio = f"{naive['peak_extra_bytes'] / max(chunked['peak_extra_bytes'], 1):.1f}x"
            a, b = chunked["checksum"], naive["checksum"]
            agree = "yes" if abs(a - b) <= 1e-3 * max(1.0, abs(b)) else f"NO ({a:.4g} vs {b:.4g})"
        rate, pct = _achieved(path, V, T, chunked, copy_bps)
        print(
            f"| {path} | {V} | {T} | {chunk} | {sec(chunked)} | {sec(naive)} | {mib(chunked)} | {mib(naive)} "
            f"| {ratio} | {agree} | {rate} | {pct} |"
        )
    for line in skipped:
        print(f"- skipped {line}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
