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
    from harness.core.defaults import default_results_dir

    return RunConfig(method=args.method, suite=args.suite, split=args.split,
                     overrides=_parse_sets(args.set), seed=args.seed, device=args.device,
                     results_dir=args.results or default_results_dir(),
                     cache_dir=args.cache_dir, force=args.force,
                     force_references=args.force_references,
                     quiet=args.quiet, unseen_weighting=args.unseen_weighting,
                     suite_config=args.suite_config, encoder=args.encoder,
                     stream_dir=args.stream_dir, finetune_seed=args.finetune_seed)


def _splits(text: str) -> list[str]:
    """``seen``, ``unseen`` or both, comma-separated, each once, in the order given."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in ("seen", "unseen"):
            raise argparse.ArgumentTypeError(f"splits are seen and unseen, not {name!r}")
    if not names:
        raise argparse.ArgumentTypeError("name a split: seen, unseen or seen,unseen")
    return list(dict.fromkeys(names))


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
    from harness.bench.runner import run_splits, seeds_to_run

    splits, args.split = args.split, args.split[0]
    config = _run_config(args)
    records = {split: [] for split in splits}
    for seed in seeds_to_run(config, args.seeds):
        for record in run_splits(dataclasses.replace(config, seed=seed), splits):
            records[record.split].append(record)
            _print_record(record)
    for of_split in records.values():
        if len(of_split) > 1:
            _print_seed_summary(of_split, len(splits) > 1)
    return 0


def _print_seed_summary(records, name_split: bool = False) -> None:
    """Mean and standard deviation over seeds of the average and ADR."""
    import statistics

    averages = [100 * r.average for r in records]
    adrs = [r.adr for r in records]
    where = f" ({records[0].split} split)" if name_split else ""
    print(f"\n{records[0].label}{where} over seeds {', '.join(str(r.seed) for r in records)}: "
          f"Avg {statistics.mean(averages):.2f} ± {statistics.stdev(averages):.2f}  "
          f"ADR {statistics.mean(adrs):.2f} ± {statistics.stdev(adrs):.2f} (mean ± sd)")


def cmd_export(args) -> int:
    from harness.bench.export import export

    if args.task is None and not args.all_tasks:
        raise ValueError("say which model to export: --task T, or --all-tasks")
    written = export(_run_config(args), args.out, args.task)
    for item in written:
        what = "the merged backbone" if item.task is None else f"task {item.task}"
        print(f"exported {what}: {item.folder}")
    print("load with transformers: AutoModelForSequenceClassification.from_pretrained(folder)"
          if any(item.task for item in written) else
          "load with transformers: AutoModel.from_pretrained(folder)")
    return 0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _grid(pairs: list[str]) -> dict[str, list[str]]:
    grid = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        if not sep or not name.strip() or not _names(values):
            raise ValueError(f"--grid takes name=v1,v2,..., got {pair!r}")
        grid[name.strip().replace("-", "_")] = _names(values)
    return grid


def cmd_sweep(args) -> int:
    from harness.bench.leaderboard import render_all
    from harness.bench.sweep import (MAX_CELLS_WITHOUT_YES, SweepOptions, expand, summary,
                                     sweep)
    from harness.core.defaults import default_leaderboard_dir, default_results_dir

    suites = _names(args.suite)
    cells = expand(suites, _names(args.methods), _names(args.splits), args.seeds or [0],
                   _grid(args.grid))
    if len(cells) > MAX_CELLS_WITHOUT_YES and not args.yes:
        raise ValueError(f"the grid has {len(cells)} cells (over {MAX_CELLS_WITHOUT_YES}): "
                         "pass --yes to run them all, or --dry-run to list them")
    results = args.results or default_results_dir()
    options = SweepOptions(results, args.cache_dir, args.device, args.reproducible, args.force,
                           args.finetune_seed, args.workers, args.executor, args.address,
                           args.gpus, args.partition, args.time, args.log_dir)
    outcomes = sweep(cells, options, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    out = default_leaderboard_dir(results)
    for suite in suites:
        for item in render_all(results, out, suite)[0]:
            _write_changed(item)
        print(f"leaderboard: {os.path.join(out, suite + '.md')}")
    for line in summary(outcomes):
        print(line)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def cmd_validate(args) -> int:
    from harness.bench.runner import validate

    suite, method = validate(_run_config(args))
    print(f"ok: {method.name} {method.params()} on {suite.name} "
          f"({len(suite.split_tasks(args.split))} {args.split} tasks)")
    plan = suite.first_run_plan()
    if plan:
        print("before merging, the first run will:")
        for line in plan:
            print(f"  - {line}")
    sources = suite.download_sources()
    if not sources or args.no_network_check:
        return 0
    from harness.bench.reachability import probe

    print("its downloads come from:")
    unreachable = 0
    for source in sources:
        problem = source.problem or probe(source.url)
        unreachable += problem is not None
        where = f" ({source.url})" if source.url else ""
        print(f"  - {source.what}{where}: "
              + ("reachable" if problem is None else f"NOT reachable: {problem}"))
    if unreachable:
        print(f"error: {unreachable} download source(s) cannot be reached from here; the first "
              "run would fail. Fetch the files on a connected machine and place them where the "
              "plan above says (or fix the proxy or index settings)", file=sys.stderr)
        return 1
    return 0


def cmd_finetune(args) -> int:
    from harness.bench.build import UNPINNED_BUILDS, build_pinned
    from harness.bench.runner import check_device, get_suite
    from harness.core.reproducible import is_pinned
    from harness.io.files import check_writable_folder

    check_device(args.device)
    suite = get_suite(args.suite, args.cache_dir, config=args.suite_config,
                      finetune_seed=args.finetune_seed)
    check_writable_folder(suite.cache_dir, "--cache-dir")
    if (suite.builds and not suite.built() and not is_pinned()
            and os.environ.get(UNPINNED_BUILDS) != "1"):
        build_pinned(suite.name, suite.cache_dir, args.suite_config, args.quiet,
                     args.finetune_seed)
        suite = get_suite(args.suite, args.cache_dir, config=args.suite_config,
                          finetune_seed=args.finetune_seed)
    print(f"ok: {suite.finetune(progress=not args.quiet, device=args.device)}")
    return 0


def cmd_ls(args) -> int:
    from harness.bench import catalog
    from harness.core.defaults import default_cache_dir
    from harness.core.registry import SUITES

    listing = catalog.load(default_cache_dir())
    if args.what == "methods":
        suite = SUITES.canonical(args.suite) if args.suite else None
        if suite is not None:
            print(f"defaults as suite {suite!r} applies them (marked *)\n")
        for m in listing.methods:
            print(f"{m.name}  [{m.kind}]  {m.title}: {m.summary}")
            applied = m.applied.get(suite, {}) if suite is not None else {}
            for hp in m.hyperparameters:
                value, mark = (applied[hp.name], " *") if hp.name in applied else \
                    (hp.default, "")
                print(f"    {hp.name}: {hp.type} = {value}{mark}  {hp.help}")
    else:
        for s in listing.suites:
            print(f"{s.name}  [{s.family}]  seen: {', '.join(s.seen)}; "
                  f"unseen: {', '.join(s.unseen) or '-'}")
    return 0


def cmd_leaderboard(args) -> int:
    from harness.bench.leaderboard import render_all
    from harness.core.defaults import default_leaderboard_dir, default_results_dir

    folders = args.results or [default_results_dir()]
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the results folder {folder} does not exist (pass "
                                    "--results with the folder `harness run` wrote to)")
    out = args.out or default_leaderboard_dir(folders[0])
    rendered, skipped = render_all(folders, out, args.suite)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    stale = []
    for item in rendered:
        if args.check:
            if _read_text(item.path) != item.text:
                stale.append(item.path)
        else:
            print(f"{'wrote' if _write_changed(item) else 'unchanged'} {item.path}")
    if stale:
        print("out of date (run `harness leaderboard`): " + ", ".join(stale), file=sys.stderr)
        return 1
    if args.check:
        print(f"ok: {len(rendered)} leaderboard(s) in {out} match their results")
    elif not rendered:
        print(f"no results in {', '.join(folders)}: nothing to render")
    return 0


def _write_changed(item) -> bool:
    """Write a rendered leaderboard file (atomically) unless it holds that text already;
    whether it was written."""
    from harness.io.files import write_text_atomic

    if _read_text(item.path) == item.text:
        return False
    write_text_atomic(item.path, item.text)
    return True


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


def _finetune_seed(text: str) -> int:
    from harness.tasks.base import check_finetune_seed

    try:
        value = int(text)
        check_finetune_seed(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer from 0 to 1000, got {text!r}") from None
    return value


def cmd_compare(args) -> int:
    from harness.bench.analysis import compare, find_row, individual_row

    a, b = (find_row(spec, args.suite, args.split, args.results, seed)
            for spec, seed in ((args.a, args.finetune_seed),
                               (args.b, args.finetune_seed if args.b_finetune_seed is None
                                else args.b_finetune_seed)))
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


RESULTS_HELP = ("result files folder (default: $MERGE_HARNESS_RESULTS, else "
                "~/.cache/merge-harness/leaderboards/results)")


def build_parser() -> argparse.ArgumentParser:
    from harness.core.defaults import DEFAULT_SUITE

    parser = argparse.ArgumentParser(prog="harness", description="Benchmark model merging.")
    sub = parser.add_subparsers(dest="command", required=True)

    def cache_option(p):
        p.add_argument("--cache-dir", default=None,
                       help="suite cache (default $MERGE_HARNESS_CACHE or ~/.cache/merge-harness)")
        p.add_argument("--suite-config", default=None, metavar="FILE",
                       help="an edited copy of a paper suite's tasks/configs/<suite>.toml")
        p.add_argument("--finetune-seed", type=_finetune_seed, default=0, metavar="N",
                       help="another fine-tuning of a suite that builds its task models "
                            "(tiny, offline-text, offline-vision): its own models and results, "
                            "to measure the spread between fine-tunings (default 0: the "
                            "published models)")

    def run_options(p, several_splits=False):
        p.add_argument("--method", required=True, help="a registered method (harness ls methods)")
        p.add_argument("--suite", default=DEFAULT_SUITE, help=f"default: {DEFAULT_SUITE}")
        if several_splits:
            p.add_argument("--split", default=["seen"], type=_splits, metavar="SPLIT[,SPLIT]",
                           help="seen, unseen, or seen,unseen: both records from one merge "
                                "(default seen)")
        else:
            p.add_argument("--split", default="seen", choices=["seen", "unseen"])
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="a hyperparameter (repeatable)")
        p.add_argument("--seed", type=_seed, default=0, help="random seed (0 to 2**32-1)")
        p.add_argument("--seeds", type=_seeds, default=None, metavar="N,N,...",
                       help="run once per seed (methods with a random seed, such as DARE) and "
                            "print the mean and standard deviation")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--results", default=None, help=RESULTS_HELP)
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
    run_options(p, several_splits=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a run's names, hyperparameters and files, fast")
    run_options(p)
    p.add_argument("--no-network-check", action="store_true",
                   help="do not check that the first run's download sources answer")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("export", help="merge and write models transformers loads "
                                      "(from_pretrained)")
    run_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--task", default=None, help="the seen task whose model to export")
    which.add_argument("--all-tasks", action="store_true",
                       help="every seen task's model (a shared method: its one backbone)")
    p.add_argument("out", help="the folder to write (replaced only when the harness wrote it)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("sweep", help="a whole grid (suites x methods x splits x seeds x "
                                     "hyperparameters), resumable, then its leaderboards")
    p.add_argument("--suite", default=DEFAULT_SUITE, help="a suite or S1,S2,...")
    p.add_argument("--methods", default="all", help="all, or m1,m2,...")
    p.add_argument("--splits", default="seen,unseen", help="seen, unseen or seen,unseen")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="N,N,...",
                   help="seeds of methods with a random seed (others run once)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a hyperparameter's values, for the methods that have it (repeatable)")
    p.add_argument("--executor", default="local", choices=["local", "ray", "slurm"])
    p.add_argument("--workers", type=int, default=None,
                   help="local: cells at once (default: from cores and memory)")
    p.add_argument("--address", default=None, help="ray: the cluster address (default: local)")
    p.add_argument("--gpus", type=float, default=0, help="ray, slurm: GPUs per cell")
    p.add_argument("--partition", default=None, help="slurm: the partition")
    p.add_argument("--time", type=int, default=60, metavar="MIN", help="slurm: minutes per cell")
    p.add_argument("--log-dir", default=None, help="slurm: a log per cell here")
    p.add_argument("--results", default=None, help=RESULTS_HELP)
    cache_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reproducible", action="store_true", help="every cell pinned (see run)")
    p.add_argument("--force", action="store_true", help="run cells whose records exist")
    p.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    p.add_argument("--yes", action="store_true", help="run a grid of over 1,000 cells")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("finetune", help="build a suite's task models (cached; run on first use)")
    p.add_argument("--suite", default=DEFAULT_SUITE, help=f"default: {DEFAULT_SUITE}")
    cache_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (paper suites)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("ls", help="list methods (with hyperparameters) or suites")
    p.add_argument("what", choices=["methods", "suites"])
    p.add_argument("--suite", default=None,
                   help="with `methods`: show the hyperparameter values this suite applies")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("compare", help="paired comparison of two rows: differences, intervals, "
                                       "p-values")
    p.add_argument("--suite", required=True)
    p.add_argument("--split", default="seen", choices=["seen", "unseen"])
    p.add_argument("--results", default=None, help=RESULTS_HELP)
    p.add_argument("--finetune-seed", type=_finetune_seed, default=0, metavar="N",
                   help="the fine-tuning seed of the rows named by label (default 0)")
    p.add_argument("--b-finetune-seed", type=_finetune_seed, default=None, metavar="N",
                   help="row b's fine-tuning seed, when it differs from row a's (the spread "
                        "between fine-tunings: the same method on two sets of task models)")
    p.add_argument("a", help="a row label (as the leaderboard shows it) or a record file")
    p.add_argument("b", help="the row to compare it with")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("leaderboard", help="render leaderboards/<suite>.md from result files")
    p.add_argument("--suite", default=None, help="one suite (default: every suite with results "
                                                  "or the paper's reported figures)")
    p.add_argument("--results", action="append", default=None, metavar="DIR",
                   help="a results folder (repeatable: yours beside the checked-in "
                        "leaderboards/results; where two hold the same cell, the first wins). "
                        "Default: $MERGE_HARNESS_RESULTS, else "
                        "~/.cache/merge-harness/leaderboards/results")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the markdown goes (default: beside the first results folder, "
                        "i.e. its parent)")
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
    except BrokenPipeError:          # `harness ls methods | head`: the reader stopped
        sys.stderr.close()
        return 0
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
