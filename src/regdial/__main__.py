"""``python -m regdial``: the same as the ``regdial`` command."""

from regdial.cli import main

main()
