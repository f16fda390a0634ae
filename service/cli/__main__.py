"""``python -m service.cli``: the ``nestor`` command."""

from . import main

raise SystemExit(main())
