"""ResNet (transformers' port): convolutions and BatchNorm, a linear classifier head."""

from optc.architectures.family import Family

FAMILY = Family(
    name="resnet", model_types=("resnet",), task="vision", gated_mlp=False, norm="batchnorm",
    keep_float=("classifier",), embeddings=(),
)
