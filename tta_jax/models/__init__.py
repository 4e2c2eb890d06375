"""Networks: the ResUNet segmentor (and, later, discriminator and adaptor)."""
from tta_jax.models.resunet import ResUNet, init_variables

__all__ = ["ResUNet", "init_variables"]
