"""`python -m hf_batch_entropy.diagnosis ...`: see `hf_batch_entropy.diagnosis.cli`."""

import sys

from .cli import main

sys.exit(main())
