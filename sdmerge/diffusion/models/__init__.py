"""The layouts of the diffusion model families: where their blocks are and where merging goes
(:mod:`sdmerge.diffusion.layout`)."""

from . import unet

LAYOUTS = (unet,)
"""The layout modules, in the order a model is matched against them."""
