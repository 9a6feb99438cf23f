"""``python -m qdit_jax`` is the ``qdit`` command."""
import sys

from qdit_jax.cli.main import main

sys.exit(main())
