"""14-finding chest X-ray classifiers over timm: presets, the network, training, predictions.

* :mod:`~cxrsynth.classify.presets` — :class:`ClassifierConfig` and the registry
  (``paper``: ConvNeXt-base at 256 px with the paper's settings; ``small``: CPU-sized);
* :mod:`~cxrsynth.classify.model` — any timm model with 14 outputs and one input channel,
  local pretrained weights, saving and loading;
* :mod:`~cxrsynth.classify.train` — masked BCE, EMA, best epoch by tuning loss, exact
  resume, DDP;
* :mod:`~cxrsynth.classify.predict` — one probability per finding per image, to parquet.

Data comes from :mod:`cxrsynth.loader`; the CLI is ``cxrsynth classifier train|predict``.
"""

from cxrsynth.classify.presets import PRESETS, ClassifierConfig, get_preset, register_preset

__all__ = ["PRESETS", "ClassifierConfig", "get_preset", "register_preset"]
