import sys

from balance_gate.cli import main

sys.exit(main())
