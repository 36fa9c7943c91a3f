"""Layers, modules and models with PyTorch's familiar shape."""

from . import init
from .layers import (
                     AvgPool2d,
                     BatchNorm1d,
                     BatchNorm2d,
                     Conv2d,
                     Dropout,
                     Flatten,
                     Hardswish,
                     Hardtanh,
                     Identity,
                     LeakyReLU,
                     Linear,
                     MaxPool2d,
                     ReLU,
                     ReLU6,
                     Sigmoid,
                     Tanh,
)
from .models import MODELS, build_model
from .module import Module, Parameter, Sequential, manual_seed

__all__ = ["init", "Module", "Parameter", "Sequential", "manual_seed", "Linear", "Conv2d",
           "MaxPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Dropout", "Flatten",
           "Identity", "ReLU", "LeakyReLU", "ReLU6", "Hardtanh", "Hardswish", "Sigmoid", "Tanh", "MODELS",
           "build_model"]
