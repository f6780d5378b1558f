"""Run entry points one after another in the same launched processes (they start once, which is most of the cost):

    accelerate launch ... tests/launch_driver.py '[["full.cache:main", [argv...]],
                                                   ["full.evaluate:main", [argv...]]]'

Each entry is `module:function` called with its argv, exactly what `python -m full.cache` / `-m full.evaluate`
call (their `__main__` adds only the one-line error printing).
"""

import importlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as full/cache.py does
for target, argv in json.loads(sys.argv[1]):
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(argv)
