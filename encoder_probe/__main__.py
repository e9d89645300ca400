"""``python -m encoder_probe`` is the ``probe`` command (what torchrun launches with ``-m``)."""
import sys

from .cli import main

sys.exit(main())
