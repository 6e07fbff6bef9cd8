import sys

from djinnd.cli import main

sys.exit(main())
