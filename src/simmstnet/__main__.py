"""``python -m simmstnet`` (what torchrun launches) is the ``simmstnet`` command."""
import sys

from simmstnet.cli import main

sys.exit(main())
