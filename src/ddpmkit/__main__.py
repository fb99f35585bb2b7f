"""``python -m ddpmkit`` (and ``accelerate launch -m ddpmkit``) runs the ``ddpm`` command."""

from .cli import main

raise SystemExit(main())
