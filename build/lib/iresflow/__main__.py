"""``python -m iresflow ...`` is the ``iresflow`` command."""

from iresflow.run.commands import main

raise SystemExit(main())
