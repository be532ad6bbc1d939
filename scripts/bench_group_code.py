"""Time and peak memory of DTS's 4-group code on one large factor.

    python scripts/bench_group_code.py                    # 50 M float32 entries
    python scripts/bench_group_code.py --entries 233000000   # a 14B embedding's U_r at 0.3

``group_encode`` thresholds a whole singular-vector matrix at once (the median split runs over
all its entries), so its working memory on top of the factor bounds DTS's memory on the largest
matrices. Prints the wall time and the peak resident memory above the factor itself, in GiB and
in bytes per entry (Linux ``VmHWM``, reset once the factor is built).
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.bench.provenance import peak_rss_bytes
from harness.methods.dts import group_encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=50_000_000)
    parser.add_argument("--grouping", choices=["matrix", "vector"], default="matrix")
    args = parser.parse_args()
    rank = 256
    factor = torch.randn(args.entries // rank, rank, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:     # VmHWM from here on
        f.write("5")
    held = peak_rss_bytes()
    start = time.perf_counter()
    group_encode(factor, 1 if args.grouping == "vector" else None)
    seconds = time.perf_counter() - start
    above = peak_rss_bytes() - held
    print(f"group_encode of {factor.numel():,} float32 entries ({factor.nbytes / 2**30:.2f} GiB, "
          f"grouping {args.grouping}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads): {seconds:.2f} s, peak {above / 2**30:.2f} GiB above the factor "
          f"({above / factor.numel():.1f} bytes per entry)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
