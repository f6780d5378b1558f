"""`python -m full.data check | convert ...`: the command line is full/data_commands.py (command lines live at the top
of full/, the readers and converters below them)."""

import sys

from full.data_commands import main

sys.exit(main())
