"""The MaskInversion engine over a frozen open_clip vision tower."""
