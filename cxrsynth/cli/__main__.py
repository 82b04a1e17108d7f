"""``python -m cxrsynth.cli`` (and ``torchrun -m cxrsynth.cli``)."""

from cxrsynth.cli import app

app()
