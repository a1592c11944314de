"""``python -m jemtorch ...`` works like ``jem ...`` (and under ``torchrun``)."""
import sys

from .cli import main

sys.exit(main())
