"""``python -m cantata`` = the ``cantata`` command."""

import sys

from cantata.cli.main import main

sys.exit(main())
