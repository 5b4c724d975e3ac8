import sys

from llamette.cli import main

sys.exit(main())
