"""``python -m cxrsynth``."""

from cxrsynth.cli import app

app()
