"""``python -m influx``: the ``influx`` command (see :mod:`influx.cli`)."""

import sys

from influx.cli import main

sys.exit(main())
