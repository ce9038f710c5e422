"""The layouts of the diffusion model families: where their blocks are and where merging goes
(:mod:`sdmerge.diffusion.layout`). :mod:`.dit` holds what the diffusion transformers share."""

from . import flux, pixart, sd3, unet

LAYOUTS = (unet, sd3, pixart, flux)
"""The layout modules, in the order a model is matched against them."""
