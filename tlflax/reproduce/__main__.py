"""`python -m tlflax.reproduce`: see `tlflax/reproduce/__init__.py`."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Planning imports the data configs.

from tlflax.reproduce import cli  # noqa: E402  pylint: disable=g-import-not-at-top

sys.exit(cli.main())
