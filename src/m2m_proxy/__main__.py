"""``python -m m2m_proxy``: the same as the ``m2m-proxy`` command."""

import sys

from m2m_proxy.cli import main

sys.exit(main())
