"""``python -m beam_captions`` is the ``beam-captions`` command."""

import sys

from beam_captions.cli import main

sys.exit(main())
