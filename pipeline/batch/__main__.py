"""`python -m pipeline.batch`: the batch worker (see `pipeline.batch.worker`)."""

import sys

from .worker import main

sys.exit(main(sys.argv[1:]))
