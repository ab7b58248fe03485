"""``python -m iresflow.sweep SPEC ...`` is ``iresflow sweep SPEC ...``."""

from iresflow.sweep.command import main

raise SystemExit(main())
