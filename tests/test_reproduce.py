"""`python -m tlflax.reproduce`: registry, runs and resume, bands, --accept, dirty trees, README.

No real training: the runs go to `FAKE_MAIN`, a stand-in for `python -m tlflax.main` that
writes summary.json (accuracy 0.9 + 0.01 x seed) in a fraction of a second, and the git
checks run on a throwaway repository.
"""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tlflax.reproduce import cli, entries, readme, runner
from tlflax.reproduce.entries import Entry

FAKE_MAIN = '''
import json, sys
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = Path(args["workdir"])
workdir.mkdir(parents=True, exist_ok=True)
with open(workdir / "invocations.txt", "a") as f:
  f.write(" ".join(sys.argv[1:]) + "\\n")
acc = 0.9 + 0.01 * int(args.get("config.seed", "0"))
(workdir / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/accuracy": acc}) + "\\n")
(workdir / "summary.json").write_text(json.dumps(
    {"eval/accuracy": acc, "eval/num_examples": 360, "step": 2}))
'''
TINY = f"{REPO / 'tests' / 'tiny.py'}:2"
FULL = Entry("tiny", TINY, ("eval/accuracy",), table="classification", label="`tiny.py`",
             what="digits, 2 steps")
QUICK = Entry("quick_tiny", TINY, ("eval/accuracy",), quick=True)
README = """# x

<!-- reproduce:classification -->
| old | typed | table |
<!-- /reproduce:classification -->
"""


def git(repo, *args):
  return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t",
                         *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def setup(tmp_path, monkeypatch):
  """A committed throwaway repo with README markers, a fake trainer, and a `run` helper."""
  repo = tmp_path / "repo"
  (repo / "experiments" / "results").mkdir(parents=True)
  (repo / "README.md").write_text(README)
  (repo / "code.py").write_text("x = 1\n")
  git(repo, "init", "-q")
  git(repo, "add", ".")
  git(repo, "commit", "-qm", "init")
  fake = tmp_path / "fake_main.py"
  fake.write_text(FAKE_MAIN)
  monkeypatch.chdir(tmp_path)  # main() changes directory; this restores it afterwards.
  root = tmp_path / "work"

  def run(*args, registry=(FULL, QUICK)):
    return cli.main(["--repo", str(repo), "--workroot", str(root), *args],
                    registry=list(registry), launcher=[sys.executable, str(fake)])

  def expect(name, metric, value, tol):
    path = repo / "experiments" / "results" / "expected.json"
    path.write_text(json.dumps({name: {metric: {"value": value, "tol": tol}}}))
    return path

  return repo, root, run, expect


def test_run_writes_results_skips_finished_and_checks_bands(setup, capsys):
  repo, root, run, expect = setup
  expect("tiny", "eval/accuracy", 0.905, 0.01)
  assert run("tiny") == 0
  results = json.loads((repo / "experiments" / "results" / "tiny.json").read_text())
  assert results["metrics"] == {"eval/accuracy": pytest.approx(0.9)}
  assert results["commit"] == git(repo, "rev-parse", "HEAD").strip()
  assert results["dirty"] is False and results["wall_s"] >= 0 and results["date"]
  assert results["machine"]["cores"] >= 1 and "cores" in results["machine"]["line"]
  assert set(results["machine"]["isa"]) <= {"avx2", "avx512f"}
  assert "0.900 (324/360)" in (repo / "README.md").read_text()  # A full run rewrites it.
  assert run("tiny") == 0  # Finished: not run again.
  assert len((root / "tiny" / "invocations.txt").read_text().splitlines()) == 1
  expect("tiny", "eval/accuracy", 0.5, 0.01)
  capsys.readouterr()
  assert run("tiny") == 1
  err = capsys.readouterr().err
  assert "tiny: eval/accuracy = 0.9000, outside the expected 0.5000 +- 0.0100" in err


def test_accept_prints_what_moved_and_only_accept_changes_expected(setup, capsys):
  repo, _, run, expect = setup
  path = expect("tiny", "eval/accuracy", 0.5, 0.01)
  before = path.read_text()
  assert run("tiny") == 1
  assert path.read_text() == before  # A plain run never moves an expectation.
  assert run("--accept") == 2  # Names are required.
  capsys.readouterr()
  assert run("--accept", "tiny") == 0
  assert "tiny: eval/accuracy: 0.5000 +- 0.0100 -> 0.9000 +- 0.0100" in capsys.readouterr().out
  assert json.loads(path.read_text()) == {"tiny": {"eval/accuracy": {"value": 0.9, "tol": 0.01}}}
  assert run("tiny") == 0


def test_quick_seeds_stay_in_the_work_root_and_set_bands_from_the_spread(setup, capsys):
  repo, root, run, _ = setup
  assert run("--quick", "--seeds", "0,1,2") == 0
  assert not (repo / "experiments" / "results" / "quick_tiny.json").exists()
  assert git(repo, "status", "--porcelain") == ""  # --quick writes nothing into the tree.
  results = json.loads((root / "results" / "quick_tiny.json").read_text())
  assert results["metrics"]["eval/accuracy"] == pytest.approx(0.91)
  assert results["spread"]["eval/accuracy"] == pytest.approx(0.02)
  assert sorted(results["seeds"]) == ["0", "1", "2"]
  assert (root / "quick_tiny" / "seed=2" / "summary.json").exists()
  capsys.readouterr()
  assert run("--quick", "--accept") == 0
  assert "(none) -> 0.9100 +- 0.0600 (seed spread 0.0200)" in capsys.readouterr().out
  expected = json.loads((repo / "experiments" / "results" / "expected.json").read_text())
  assert expected["quick_tiny"]["eval/accuracy"] == {"value": 0.91, "tol": 0.06}


def test_dirty_tree_is_refused_unless_allowed(setup, capsys):
  repo, root, run, _ = setup
  (repo / "workdirs" / "old").mkdir(parents=True)
  (repo / "workdirs" / "old" / "log.txt").write_text("untracked run output: not dirty\n")
  (repo / "code.py").write_text("x = 2\n")
  assert run("tiny") == 2
  err = capsys.readouterr().err
  assert "uncommitted changes (code.py)" in err and "--allow_dirty" in err
  assert not (root / "tiny").exists()  # Refused before anything ran.
  assert run("tiny", "--allow_dirty") == 0
  results = json.loads((repo / "experiments" / "results" / "tiny.json").read_text())
  assert results["dirty"] is True


def test_readme_tables_come_from_results_files_only(tmp_path):
  other = Entry("other", TINY, ("eval/accuracy",), table="classification", label="`o.py`")
  path = tmp_path / "README.md"
  path.write_text(README + "\nkept\n")
  record = {"metrics": {"eval/accuracy": 0.978}, "summary": {"eval/num_examples": 360},
            "wall_s": 28.4, "commit": "abcdef123456", "dirty": False, "date": "2026-11-27T10:00",
            "machine": {"cores": 2}}
  readme.update(path, [FULL, other], {"tiny": record}, kinds=["classification"])
  text = path.read_text()
  assert "| `tiny` | `tiny.py` | digits, 2 steps | 0.978 (352/360) | 28 s | `abcdef1`, " \
         "2026-11-27, 2 cores |" in text
  assert "| `other` | `o.py` |  | not re-made | - | - |" in text
  assert "typed" not in text and text.endswith("kept\n")
  with pytest.raises(ValueError, match="reproduce:segmentation"):
    readme.update(path, [FULL], {}, kinds=["segmentation"])


def test_unknown_names_fail_with_close_matches(setup, capsys):
  with pytest.raises(ValueError, match="did you mean pets_seg_unet"):
    entries.select(entries.ENTRIES, ["pets_seg_unett"], quick=False)
  _, root, run, _ = setup
  assert run("tiny", "tinny") == 2
  assert "'tinny' (did you mean tiny" in capsys.readouterr().err
  assert not root.exists()


def test_the_registry_covers_the_readme_and_validates(tmp_path, monkeypatch):
  """Every entry's overrides exist in its config, and each README table has its markers."""
  monkeypatch.chdir(REPO)
  names = [e.name for e in entries.ENTRIES]
  assert len(names) == len(set(names))
  assert {e.table for e in entries.ENTRIES if not e.quick} == set(entries.TABLES)
  assert all(e.quick == e.name.startswith("quick_") for e in entries.ENTRIES)
  for entry in entries.ENTRIES:
    runner.make_run(entry, tmp_path)
  text = (REPO / "README.md").read_text()
  for kind in entries.TABLES:
    assert f"<!-- reproduce:{kind} -->" in text and f"<!-- /reproduce:{kind} -->" in text


def test_training_loss_figures_read_tensorboard(tmp_path):
  """`train/loss`: the last logged value; `mean/train/loss`: the mean of all of them."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(str(tmp_path))
  for step, loss in ((10, 3.0), (20, 2.0), (30, 1.0)):
    writer.write_scalars(step, {"train/loss": loss})
  writer.close()
  (tmp_path / "summary.json").write_text(json.dumps({"eval/AP": 0.5}))
  entry = Entry("det", TINY, ("train/loss", "mean/train/loss", "eval/AP", "eval/absent"))
  assert runner.figures(entry, tmp_path) == {
      "train/loss": pytest.approx(1.0), "mean/train/loss": pytest.approx(2.0), "eval/AP": 0.5}
