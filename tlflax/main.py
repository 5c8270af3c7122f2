"""Command line: `python -m tlflax.main --config configs/NAME.py[:ARG] --workdir DIR`.

Any config field can be overridden, e.g. `--config.optim.lr=0.01`. Running the
same command on the same DIR resumes from its latest checkpoint.
"""
import logging as logging_std
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # Hide TensorFlow's INFO banner.

from absl import app, flags, logging
from ml_collections import config_flags

from tlflax import distributed, xla_env

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax / tfds (hundreds of lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("XLA_FLAGS=%s", xla_env.configure())  # Before JAX creates its backend.
  distributed.initialize(_CONFIG.value.get("distributed"))  # Also before the backend.
  from tlflax import train  # pylint: disable=g-import-not-at-top
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from tlflax.config import check_overrides  # pylint: disable=g-import-not-at-top
  check_overrides(sys.argv)
  app.run(main)
