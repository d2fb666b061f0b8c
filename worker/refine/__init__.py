"""Prompts to object masks: a box or a few clicks become the mask a region is inverted on (GrabCut in the box,
key-affinity seed regions, SAM when a checkpoint is configured), chosen by :mod:`worker.refine.chooser`."""
