from fastonestep.networks.build import build_denoiser, build_ratio, count_parameters
from fastonestep.networks.edm2 import EDM2EncoderRatioNet, EDM2UNet
from fastonestep.networks.mlp import MLP
from fastonestep.networks.ratio import EncoderRatioNet, RatioPrecond
from fastonestep.networks.unet import UNet, UNetEncoder

__all__ = ["MLP", "UNet", "UNetEncoder", "EncoderRatioNet", "EDM2UNet", "EDM2EncoderRatioNet", "RatioPrecond",
           "build_denoiser", "build_ratio", "count_parameters"]
