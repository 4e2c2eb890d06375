"""Networks: the ResUNet segmentor, the mask discriminator, the mask DAE and the input adaptor."""
from tta_jax.models.adaptor import InputAdaptor
from tta_jax.models.dae import MaskDAE
from tta_jax.models.discriminator import MaskDiscriminator
from tta_jax.models.resunet import ResUNet, init_variables

__all__ = ["InputAdaptor", "MaskDAE", "MaskDiscriminator", "ResUNet", "init_variables"]
