#!/usr/bin/env python3
"""The grouped GEMM's time under random routing, relative to balanced routing, from what each kind
of ragged last tile costs (BENCHMARKS.md runs 39-40).

Every expert's rows split into full 128-row tiles and a tail. A tail costs, in tiles of one
expert's column block (measured with balanced routing at token counts that give every expert the
same tail): a fold of <= 16 or 17-32 rows (into a full tile before it), 33-64 rows on one consumer,
65-96 and 97-127 rows on both. The model sums the costs over a draw of uniform routing and divides
by the balanced routing's full tiles. It ignores what the tails do to each other (DRAM, power),
which is why it reads ~1.5 points under the measured ratio (run 40).

    python3 scripts/tail_model.py                      # DeepSeek-V3 gate+up, T = 16384, run 40's costs
    python3 scripts/tail_model.py --costs 0.31,0.38,0.71,1.03,1.03   # the down projection (K = 2048)
"""
import argparse
import random

CLASSES = ("fold <= 16", "fold 17-32", "33-64 rows", "65-96 rows", "97-127 rows")


def tail_class(rows, block_m):
    """The tail class of an expert of `rows` rows, or None without a tail."""
    full, tail = divmod(rows, block_m)
    if tail == 0:
        return None
    if full >= 1 and tail <= 16:
        return 0
    if full >= 1 and tail <= 32:
        return 1
    if tail <= 64:
        return 2
    return 3 if tail <= 96 else 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--costs", default="0.36,0.50,0.84,1.02,1.02",
                    help="tile cost of each tail class, comma-separated (default: run 40, K = 7168, folds spread)")
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    costs = [float(c) for c in args.costs.split(",")]
    assert len(costs) == len(CLASSES), f"--costs takes {len(CLASSES)} values"

    rng = random.Random(args.seed)
    rows_total = args.tokens * args.top_k
    # Balanced routing's work: every row in a full tile.
    balanced = rows_total / args.block_m
    cost_sum = [0.0] * len(CLASSES)
    rows_sum = [0.0] * len(CLASSES)
    full_sum = 0.0
    for _ in range(args.draws):
        counts = [0] * args.experts
        for _ in range(rows_total):
            counts[rng.randrange(args.experts)] += 1
        for rows in counts:
            full_sum += rows // args.block_m
            c = tail_class(rows, args.block_m)
            if c is not None:
                cost_sum[c] += costs[c]
                rows_sum[c] += (rows % args.block_m) / args.block_m
    norm = args.draws * balanced
    ratio = (full_sum + sum(cost_sum)) / norm
    print(f"uniform / balanced = {ratio:.4f}  (T = {args.tokens}, k = {args.top_k}, E = {args.experts}, "
          f"{args.draws} draws)")
    print(f"{'tail class':<14}{'cost':>6}{'share of rows':>15}{'excess (points)':>17}")
    for i, name in enumerate(CLASSES):
        print(f"{name:<14}{costs[i]:>6.2f}{100 * rows_sum[i] / norm:>14.1f}%"
              f"{100 * (cost_sum[i] - rows_sum[i]) / norm:>17.2f}")


if __name__ == "__main__":
    main()
