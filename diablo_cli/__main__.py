"""``python -m diablo_cli`` (and ``accelerate launch -m diablo_cli``) runs the same app as ``diablo``."""

from .entry import main

main()
