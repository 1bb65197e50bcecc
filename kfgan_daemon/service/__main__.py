"""``python -m kfgan_daemon.service``: the daemon without the full CLI (same as ``kfgan-daemon serve``)."""
import sys

from kfgan_daemon.service.server import main

sys.exit(main())
