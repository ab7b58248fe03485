"""``python -m iresflow.reproduce TARGET`` is ``iresflow reproduce TARGET``."""

from iresflow.reproduce import main

raise SystemExit(main())
