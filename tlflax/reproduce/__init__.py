"""`python -m tlflax.reproduce [NAMES...]`: re-make the reported figures and check them.

Every figure the README "Results" tables and the config docstrings report has a named entry
(`tlflax/reproduce/entries.py`): a config spec, overrides, and the `summary.json` keys that
are its figures. Running an entry is `python -m tlflax.main --config SPEC --workdir
WORKROOT/<name> --config.a.b=V ...` in a subprocess (the sweep runner of
`tlflax.experiments`: a finished workdir is skipped, an interrupted one resumes), then

  experiments/results/<name>.json   figures, wall time, machine line (CPU model, cores,
                                    avx512f / avx2), date, git commit, dirty flag
  experiments/results/expected.json {name: {metric: {"value", "tol"}}}: each figure is
                                    checked against its band; outside it, the exit status
                                    is 1 and the config, metric, measured and expected
                                    values are printed
  README.md                         the three Results tables, between
                                    `<!-- reproduce:KIND -->` markers, from the results files

  python -m tlflax.reproduce --list                    entries, their state and bands
  python -m tlflax.reproduce                           every full entry (hours on a CPU)
  python -m tlflax.reproduce pets_seg_fcn quickstart   some of them
  python -m tlflax.reproduce --quick --workroot /tmp/q  the CI check (~3.5 min, writes nothing
                                                       into the tree: results go to
                                                       /tmp/q/results/)
  python -m tlflax.reproduce --accept NAMES            expected.json := the latest results
                                                       (prints old -> new); never done by a
                                                       plain run
  python -m tlflax.reproduce --quick --seeds 0,1,2 --workroot W   one run per seed, then
  python -m tlflax.reproduce --quick --accept --workroot W   bands from the seeds' spread
  python -m tlflax.reproduce --write_readme            rebuild the README tables only

A tree with uncommitted changes (other than run outputs and reproduce's own files) is
refused before anything runs, unless `--allow_dirty` (then the results say "dirty": true).

Not yet covered (their figures are made by other commands, not by `tlflax.main` runs with a
`summary.json`): the few-shot and episodic tables (experiments/FEWSHOT.md: `tlflax.fewshot`,
`tlflax.episodic`), the transferability ranking (experiments/RANKING.md: `tlflax.rank`) and
the strategies sweep (experiments/results/hymenoptera_strategies: `tlflax.sweep`, 15 runs,
~2 h); rerun those with their own commands.
"""
from tlflax.reproduce.entries import ENTRIES, Entry  # noqa: F401
