"""``python -m worker`` is ``report-forwarder``."""

from .cli import main

main()
