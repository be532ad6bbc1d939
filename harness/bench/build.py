"""``python -m harness.bench.build --suite S``: build a suite's models reproducibly.

Re-executes itself in the pinned environment of :mod:`harness.core.reproducible` (portable
kernels, MKL's reproducible mode, one thread, deterministic algorithms), then runs the suite's
``prepare``: every model it trains gets the same bytes on any x86-64 machine with the pinned
packages, and its cache entry records the machine that built it. ``harness run`` and
``harness finetune`` call this for suites that train their models (``Suite.builds``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from harness.core.reproducible import is_pinned, pin_torch, pinned_command

# set to 1: a suite's models built by an unpinned process are accepted (faster, not reproducible
# across machines; the tests use it)
UNPINNED_BUILDS = "MERGE_HARNESS_UNPINNED_BUILDS"


def build_pinned(suite: str, cache_dir: str | None, suite_config: str | None = None,
                 quiet: bool = False, finetune_seed: int | None = None) -> None:
    """Build ``suite``'s models in a pinned child process; raises naming the suite on failure."""
    args = ["--suite", suite]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    if suite_config:
        args += ["--suite-config", suite_config]
    if finetune_seed:
        args += ["--finetune-seed", str(finetune_seed)]
    if quiet:
        args.append("--quiet")
    argv, env = pinned_command("harness.bench.build", *args)
    child = subprocess.run(argv, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"the pinned build of suite {suite!r} failed (exit code "
                           f"{child.returncode}); its output is above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--suite-config", default=None)
    parser.add_argument("--finetune-seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not is_pinned():
        try:
            build_pinned(args.suite, args.cache_dir, args.suite_config, args.quiet,
                         args.finetune_seed)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    pin_torch()
    from harness.bench.lookup import get_suite

    suite = get_suite(args.suite, args.cache_dir, config=args.suite_config,
                      finetune_seed=args.finetune_seed)
    suite.prepare(progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
