"""``python -m iresflow ...`` is the ``iresflow`` command."""

from iresflow.cli import main

raise SystemExit(main())
