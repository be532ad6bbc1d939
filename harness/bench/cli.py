"""The ``harness`` command: argument parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tabulate import tabulate


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes name=value, got {pair!r}")
        out[name.strip()] = value.strip()
    return out


def _run_config(args):
    from harness.bench.runner import RunConfig

    return RunConfig(method=args.method, suite=args.suite, split=args.split,
                     overrides=_parse_sets(args.set), seed=args.seed, device=args.device,
                     results_dir=args.results, cache_dir=args.cache_dir, force=args.force,
                     force_references=args.force_references,
                     quiet=args.quiet, unseen_weighting=args.unseen_weighting,
                     suite_config=args.suite_config, encoder=args.encoder,
                     stream_dir=args.stream_dir)


def _print_record(record) -> None:
    """A run record as a table and a few summary lines."""
    rows = [[task, score.metric, f"{100 * score.value:.2f}"]
            for task, score in record.tasks.items()]
    print(tabulate(rows, ["task", "metric", "value %"], tablefmt="github", disable_numparse=True))
    amr = record.amr
    paper = f" (paper count {amr.paper_mean:.3f}%)" if amr.paper_mean is not None else ""
    print(f"\n{record.label} on {record.suite} ({record.split} split): "
          f"Avg {100 * record.average:.2f}  ADR {record.adr:.2f}%  AMR {amr.mean:.3f}%{paper}")
    print(f"merge {record.merge_seconds:.1f} s, evaluation {record.eval_seconds:.1f} s, "
          f"peak RSS {record.peak_rss_bytes / 2**30:.2f} GiB"
          + (f", peak GPU {record.peak_gpu_bytes / 2**30:.2f} GiB"
             if record.peak_gpu_bytes is not None else ""))
    for task, gamma in (record.gamma or {}).items():
        print(f"gamma for {task}: " + ", ".join(f"{t} {g:.3f}" for t, g in gamma.items()))
    print(f"result: {record.path}")


def cmd_run(args) -> int:
    from harness.core.reproducible import is_pinned, pin_torch, pinned_command

    if args.reproducible and not is_pinned():      # again, in the pinned environment
        import subprocess

        argv, env = pinned_command("harness.bench.cli", *args.argv)
        return subprocess.run(argv, env=env).returncode
    if args.reproducible:
        pin_torch()
    from harness.bench.runner import run, seeds_to_run

    config = _run_config(args)
    records = []
    for seed in seeds_to_run(config, args.seeds):
        records.append(run(dataclasses.replace(config, seed=seed)))
        _print_record(records[-1])
    if len(records) > 1:
        _print_seed_summary(records)
    return 0


def _print_seed_summary(records) -> None:
    """Mean and standard deviation over seeds of the average and ADR."""
    import statistics

    averages = [100 * r.average for r in records]
    adrs = [r.adr for r in records]
    print(f"\n{records[0].label} over seeds {', '.join(str(r.seed) for r in records)}: "
          f"Avg {statistics.mean(averages):.2f} ± {statistics.stdev(averages):.2f}  "
          f"ADR {statistics.mean(adrs):.2f} ± {statistics.stdev(adrs):.2f} (mean ± sd)")


def cmd_validate(args) -> int:
    from harness.bench.runner import validate

    suite, method = validate(_run_config(args))
    print(f"ok: {method.name} {method.params()} on {suite.name} "
          f"({len(suite.split_tasks(args.split))} {args.split} tasks)")
    return 0


def cmd_finetune(args) -> int:
    from harness.bench.build import build_pinned
    from harness.bench.runner import UNPINNED_BUILDS, check_device, get_suite
    from harness.core.reproducible import is_pinned
    from harness.io.files import check_writable_folder

    check_device(args.device)
    suite = get_suite(args.suite, args.cache_dir, config=args.suite_config)
    check_writable_folder(suite.cache_dir, "--cache-dir")
    if (suite.builds and not suite.built() and not is_pinned()
            and os.environ.get(UNPINNED_BUILDS) != "1"):
        build_pinned(suite.name, suite.cache_dir, args.suite_config, args.quiet)
        suite = get_suite(args.suite, args.cache_dir, config=args.suite_config)
    print(f"ok: {suite.finetune(progress=not args.quiet, device=args.device)}")
    return 0


def cmd_ls(args) -> int:
    from harness.core.registry import METHODS, SUITES

    if args.what == "methods":
        for name in METHODS.names():
            cls = METHODS.get(name)
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{name}  [{cls.kind}]  {summary}")
            for hp in cls.hyperparameters():
                print(f"    {hp.name}: {hp.type} = {hp.default!r}  {hp.help}")
    else:
        for name in SUITES.names():
            suite = SUITES.get(name)()
            print(f"{name}  [{suite.family}]  seen: {', '.join(suite.split_tasks('seen'))}; "
                  f"unseen: {', '.join(suite.unseen) or '-'}")
    return 0


def cmd_leaderboard(args) -> int:
    from harness.io.files import write_text_atomic
    from harness.bench.leaderboard import render_all

    if not os.path.isdir(args.results):
        raise FileNotFoundError(f"the results folder {args.results} does not exist (pass "
                                "--results with the folder `harness run` wrote to)")
    rendered, skipped = render_all(args.results, args.out, args.suite)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    stale = []
    for item in rendered:
        current = _read_text(item.path)
        if args.check:
            if current != item.text:
                stale.append(item.path)
        elif current != item.text:
            write_text_atomic(item.path, item.text)
            print(f"wrote {item.path}")
        else:
            print(f"unchanged {item.path}")
    if stale:
        print("out of date (run `harness leaderboard`): " + ", ".join(stale), file=sys.stderr)
        return 1
    if args.check:
        print(f"ok: {len(rendered)} leaderboard(s) match their results")
    return 0


def _read_text(path: str) -> str | None:
    """A leaderboard file's text, or None where there is none (or it is not UTF-8 text)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _seeds(text: str) -> list[int]:
    values = [_seed(part.strip()) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct seeds, got {text!r}")
    return values


def _seed(text: str) -> int:
    from harness.bench.runner import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {text}")
    return value


def cmd_compare(args) -> int:
    from harness.bench.analysis import compare, find_row, individual_row

    a, b = (find_row(spec, args.suite, args.split, args.results) for spec in (args.a, args.b))
    comparison = compare(a, b, individual_row(a, args.results))
    rows = []
    for name, d in comparison.rows.items():
        scale = 1 if name == "ADR" else 100
        p = "< 0.001" if d.p_value == 0 else f"{d.p_value:.3f}"
        rows.append([name, f"{scale * d.a:.2f}", f"{scale * d.b:.2f}",
                     f"{scale * d.difference:+.2f}",
                     f"[{scale * d.low:+.2f}, {scale * d.high:+.2f}]", p,
                     "yes" if d.significant else "no"])
    print(f"{a.label} minus {b.label} on {a.suite} ({a.split} split): paired bootstrap over the "
          "same test examples, 1,000 resamples")
    print(tabulate(rows, ["task", a.label, b.label, "difference", "95% interval", "p",
                          "significant"], tablefmt="github", disable_numparse=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from harness.bench.records import DEFAULT_RESULTS_DIR
    from harness.bench.runner import DEFAULT_SUITE

    parser = argparse.ArgumentParser(prog="harness", description="Benchmark model merging.")
    sub = parser.add_subparsers(dest="command", required=True)

    def cache_option(p):
        p.add_argument("--cache-dir", default=None,
                       help="suite cache (default $MERGE_HARNESS_CACHE or ~/.cache/merge-harness)")
        p.add_argument("--suite-config", default=None, metavar="FILE",
                       help="an edited copy of a paper suite's tasks/configs/<suite>.toml")

    def run_options(p):
        p.add_argument("--method", required=True, help="a registered method (harness ls methods)")
        p.add_argument("--suite", default=DEFAULT_SUITE, help=f"default: {DEFAULT_SUITE}")
        p.add_argument("--split", default="seen", choices=["seen", "unseen"])
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="a hyperparameter (repeatable)")
        p.add_argument("--seed", type=_seed, default=0, help="random seed (0 to 2**32-1)")
        p.add_argument("--seeds", type=_seeds, default=None, metavar="N,N,...",
                       help="run once per seed (methods with a random seed, such as DARE) and "
                            "print the mean and standard deviation")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--results", default=DEFAULT_RESULTS_DIR, help="result files folder")
        cache_option(p)
        p.add_argument("--encoder", default=None, metavar="NAME_OR_DIR",
                       help="text encoder of unseen-task embeddings (a sentence-transformers "
                            "folder or hub name; default: the suite's)")
        p.add_argument("--unseen-weighting", default="method", choices=["method", "similarity"],
                       help="unseen split: each method's own rule, or similarity weights (eq. 8)")
        p.add_argument("--stream-dir", default=None, metavar="DIR",
                       help="write model-sized merge outputs as safetensors shards under DIR "
                            "(models larger than memory)")
        p.add_argument("--force", action="store_true",
                       help="rerun when the result exists (the reference models' scores are "
                            "kept: see --force-references)")
        p.add_argument("--force-references", action="store_true",
                       help="also measure the pretrained and individual models again")
        p.add_argument("--reproducible", action="store_true",
                       help="merge and evaluate in the pinned environment (one thread, portable "
                            "kernels): the same record on any x86-64 machine, slower")
        p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("run", help="merge a suite with a method, evaluate, record")
    run_options(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a run's names, hyperparameters and files, fast")
    run_options(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("finetune", help="build a suite's task models (cached; run on first use)")
    p.add_argument("--suite", default=DEFAULT_SUITE, help=f"default: {DEFAULT_SUITE}")
    cache_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (paper suites)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("ls", help="list methods (with hyperparameters) or suites")
    p.add_argument("what", choices=["methods", "suites"])
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("compare", help="paired comparison of two rows: differences, intervals, "
                                       "p-values")
    p.add_argument("--suite", required=True)
    p.add_argument("--split", default="seen", choices=["seen", "unseen"])
    p.add_argument("--results", default=DEFAULT_RESULTS_DIR, help="result files folder")
    p.add_argument("a", help="a row label (as the leaderboard shows it) or a record file")
    p.add_argument("b", help="the row to compare it with")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("leaderboard", help="render leaderboards/<suite>.md from result files")
    p.add_argument("--suite", default=None)
    p.add_argument("--results", default=DEFAULT_RESULTS_DIR)
    p.add_argument("--out", default="leaderboards")
    p.add_argument("--check", action="store_true", help="fail when a file is out of date")
    p.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: results already written are intact", file=sys.stderr)
        return 130
    except OSError as exc:           # a full disk, a read-only place, a missing file...
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    """One line naming the path and the problem."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{exc.strerror}: {where}"


if __name__ == "__main__":
    sys.exit(main())
