"""Kubernetes-native DreamBooth fine-tuning for Stable Diffusion.

Three layers share one typed API:

* :mod:`dreambooth.api`      the ``DreamBoothJob`` types, presets, CRD generation (no kopf, no torch)
* :mod:`dreambooth.operator` the kopf operator (no torch)
* :mod:`dreambooth.trainer`  the DreamBooth trainer (torch, diffusers, transformers)
"""

__version__ = "0.1.0"
