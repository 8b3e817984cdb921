"""``python -m gmcert ...`` runs the ``gmcert`` command."""
import sys

from gmcert.cli import main

sys.exit(main())
