"""python -m full.data check | convert ...: see full/data/converters.py."""

import sys

from full.data.converters import main

sys.exit(main())
