"""The conditional diffusion generator (issue 4), one concern per module.

``presets`` (named configurations), ``model`` (ConditionalUNet, save/load),
``schedule`` (schedulers and the sampler registry), ``losses`` (v-loss + VLB),
``train`` (the loop), ``sample`` (CFG, per-image seeds), ``mediffusion`` (checkpoint
import), ``bench`` (throughput/MFU), ``fid`` (Fréchet distances). Import the modules
you need; this package imports nothing heavy by itself.
"""
