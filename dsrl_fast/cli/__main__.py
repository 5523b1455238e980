"""`python -m dsrl_fast.cli` (how torchrun and deepspeed launch the trainer)."""

import sys

from dsrl_fast.cli.app import main

sys.exit(main())
