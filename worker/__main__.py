"""``python -m worker`` is ``report-forwarder``."""

from worker.cli import main

main()
