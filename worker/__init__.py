"""MaskInversion worker: open_clip engine, image-state cache and RQ job functions.

Importing this package does not import torch; the backend imports ``worker.protocol`` only.
"""
