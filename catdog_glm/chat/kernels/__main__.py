"""python -m catdog_glm.chat.kernels: build the kernels now (make install runs it) and say which path this CPU gets."""

import json
import logging
import sys

from catdog_glm.chat import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
status = kernels.status()
print(json.dumps(status))
sys.exit(0)
