"""Throughput of the rule grader (`opd.grading`): answers graded per second on a synthetic set of responses.

The responses imitate benchmark outputs: ~1.5k characters of reasoning, then a final answer. The mix is set by
flags (default 10k responses: 70% plain numbers, right or wrong, decided by the in-process fast path; 20%
LaTeX answers that need math-verify (radicals, polynomials, multiples of pi, intervals, fractions of radicals,
with random coefficients);
10% without a final answer). Four timings, wall clock, after a warm-up of the worker processes:
  batch       grade_batch(workers=W): fast paths here, symbolic checks over W math-verify worker processes
  sequential  score_response in a loop (one worker process, as the training reward calls it)
  symbolic    as many fresh answers that all need math-verify, through grade_batch (the slow path's rate)
  toy         toy-world solutions ("...\\boxed{1234}", half wrong) through score_response, as the demo grades them
Both runs must give the same verdicts; the script checks that and prints the per-method counts.

    OMP_NUM_THREADS=1 python bench/bench_grade.py                 # ~1 min on 2 cores
    python bench/bench_grade.py --n 2000 --symbolic-frac 0.5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import Counter

from opd.grading import SymbolicChecker, clear_symbolic_cache, grade_batch, grade_response, score_response


def symbolic_item(rng: random.Random) -> tuple[str, str, str]:
    """(ground truth, an equivalent form, a wrong form) with random coefficients, so math-verify's parse cache
    in the worker cannot serve repeats."""
    a, b = rng.randint(2, 40), rng.choice([2, 3, 5, 6, 7, 10, 11, 13])
    kind = rng.randrange(5)
    if kind == 0:  # radicals
        return f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"\\sqrt{{{a * a * b + 1}}}"
    if kind == 1:  # polynomials
        return f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"x^2+{a * a}"
    if kind == 2:  # fractions of pi
        return f"\\frac{{{a}\\pi}}{{{b}}}", f"{a}\\pi/{b}", f"\\frac{{{b}\\pi}}{{{a + b}}}"
    if kind == 3:  # intervals
        return f"({-a},{b}]", f"(-{a}, {b}] \\cup \\{{{b}\\}}", f"[{-a},{b}]"
    return f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}", f"\\frac{{1}}{{{a}}}\\sqrt{{{b}}}", f"\\frac{{\\sqrt{{{b + 1}}}}}{{{a}}}"


FILLER = (
    "We first note that the quantity can be rewritten. Expanding both sides and collecting terms, "
    "the constraint reduces to a simpler relation between the variables. "
)


def make_responses(n: int, symbolic_frac: float, none_frac: float, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, gts = [], []
    for _ in range(n):
        reasoning = FILLER * rng.randint(8, 14)
        u = rng.random()
        if u < none_frac:
            gt = str(rng.randint(0, 999))
            responses.append(reasoning + "I am not sure how to finish.")
        elif u < none_frac + symbolic_frac:
            gt, good, bad = symbolic_item(rng)
            ans = good if rng.random() < 0.6 else bad
            responses.append(reasoning + f"Therefore the answer is $\\boxed{{{ans}}}$.")
        else:
            gt = str(rng.randint(0, 999))
            ans = gt if rng.random() < 0.5 else str(rng.randint(0, 999))
            responses.append(reasoning + f"So the final answer is $\\boxed{{{ans}}}$.")
        gts.append(gt)
    return responses, gts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="responses (default 10000)")
    p.add_argument("--symbolic-frac", type=float, default=0.2, help="share needing math-verify (default 0.2)")
    p.add_argument("--none-frac", type=float, default=0.1, help="share without a final answer (default 0.1)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    responses, gts = make_responses(args.n, args.symbolic_frac, args.none_frac, args.seed)
    # warm-up: worker start-up and sympy's first-use costs (the first few hundred checks of a fresh worker are slower)
    warm_r, warm_g = make_responses(1000, 1.0, 0.0, args.seed + 1)
    grade_batch(warm_r, warm_g, workers=args.workers)

    clear_symbolic_cache()  # each timed run does every symbolic check itself
    t0 = time.perf_counter()
    batch = grade_batch(responses, gts, workers=args.workers)
    t_batch = time.perf_counter() - t0

    checker = SymbolicChecker()
    for r, g in zip(warm_r[:300], warm_g[:300]):
        grade_response(r, g, checker=checker)
    clear_symbolic_cache()
    t0 = time.perf_counter()
    seq = [grade_response(r, g, checker=checker) for r, g in zip(responses, gts)]
    t_seq = time.perf_counter() - t0
    checker.close()
    if [x.score for x in seq] != [x.score for x in batch]:
        raise SystemExit("batch and sequential verdicts differ")

    # fresh answers: the workers' own parse caches already hold the ones graded above
    n_sym = sum(x.method in ("symbolic", "timeout") for x in batch)
    sym_r, sym_g = make_responses(n_sym, 1.0, 0.0, args.seed + 2)
    clear_symbolic_cache()
    t0 = time.perf_counter()
    grade_batch(sym_r, sym_g, workers=args.workers)
    t_sym = time.perf_counter() - t0

    from opd.toy.task import sample_problems

    problems = sample_problems(args.n, args.seed)
    toy = [p.solution if i % 2 else p.solution.replace("\\boxed{", "\\boxed{9") for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    toy_scores = [score_response(r, p.answer) for r, p in zip(toy, problems)]
    t_toy = time.perf_counter() - t0
    if sum(toy_scores) != args.n // 2:
        raise SystemExit(f"toy grading is wrong: {sum(toy_scores)} correct of {args.n}, expected {args.n // 2}")

    methods = Counter(x.method for x in batch)
    print(
        f"{args.n} responses, {os.cpu_count()} CPUs, workers={args.workers}; methods: {dict(methods)}; "
        f"retried after a timeout: {sum(x.retried for x in batch)}; accuracy {sum(x.score for x in batch) / args.n:.3f}"
    )
    print("| run | answers | seconds | answers/s |")
    print("|---|---:|---:|---:|")
    print(f"| batch (workers={args.workers}) | {args.n} | {t_batch:.2f} | {args.n / t_batch:,.0f} |")
    print(f"| sequential score_response | {args.n} | {t_seq:.2f} | {args.n / t_seq:,.0f} |")
    if n_sym:
        print(f"| symbolic only (workers={args.workers}) | {n_sym} | {t_sym:.2f} | {n_sym / t_sym:,.0f} |")
    print(f"| toy answers, score_response | {args.n} | {t_toy:.2f} | {args.n / t_toy:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
