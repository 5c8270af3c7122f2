"""Command line: `python -m tlflax.sweep experiments/FILE.py [--workdir ROOT] [--parallel N]
[--dry_run] [--only NAME,...] [--report_only]`.

Runs every run of the sweep file that is not done yet (each a `python -m tlflax.main`
subprocess in ROOT/<sweep>/<run>, resumable), N at a time, then writes
ROOT/<sweep>/results.{csv,md} and plots. Running it again runs nothing that finished
and resumes what was interrupted. The logic lives in `tlflax.experiments`.
Exit status: 0 when every selected run is done, 1 when one failed, 2 on a bad sweep.
"""
import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # The planner imports the data configs.


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m tlflax.sweep", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep_file", help="experiments/NAME.py defining get_sweep()")
  parser.add_argument("--workdir", default="workdirs",
                      help="root folder; runs go to ROOT/<sweep>/<run> (default: workdirs)")
  parser.add_argument("--parallel", type=int, default=1,
                      help="subprocesses at a time (default 1; on a CPU they share its cores)")
  parser.add_argument("--dry_run", action="store_true",
                      help="validate, list the runs and their state, print the commands")
  parser.add_argument("--only", default="",
                      help="comma-separated run names or shell patterns (grid sweeps)")
  parser.add_argument("--report_only", action="store_true",
                      help="rebuild results tables and plots from the workdirs, run nothing")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  from tlflax import experiments  # pylint: disable=g-import-not-at-top
  try:
    sweep = experiments.load_sweep(args.sweep_file)
    only = [p for p in args.only.split(",") if p]
    if only and sweep.search is not None:
      raise ValueError("--only applies to grid/list sweeps, not to searches.")
    if args.report_only:
      experiments.report_only(sweep, args.workdir)
      return 0
    result = experiments.run_sweep(sweep, args.workdir, parallel=args.parallel, only=only,
                                   dry_run=args.dry_run)
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  return 1 if any(s == "failed" for s in result["runs"].values()) else 0


if __name__ == "__main__":
  sys.exit(main())
