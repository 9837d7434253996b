import sys

from fractal_models.cli import main

sys.exit(main())
