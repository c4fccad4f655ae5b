import sys

from stable_megatron.cli import main

sys.exit(main())
