"""The conditional diffusion generator, one concern per module.

``presets`` (named configurations), ``model`` (ConditionalUNet, save/load),
``schedule`` (schedulers and the sampler registry), ``losses`` (v-loss + VLB),
``train`` (the loop), ``sample`` (CFG, per-image seeds), ``mediffusion`` (checkpoint
import), ``replicas`` (synthetic replica sets: ``cxrsynth generate``), ``rebalance`` (condition
rows raking rare findings up); its Fréchet distances live in :mod:`cxrsynth.evaluate.frechet`,
its benchmarks in :mod:`cxrsynth.bench`.
Import the modules you need; this package imports nothing heavy by itself.
"""
