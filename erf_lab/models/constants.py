"""Preprocessing and architecture constants."""
#: the largest kernel side a large-kernel block accepts: well beyond the published ones (RepLKNet 31, SLaK 51-61)
#: and the maps they see; a side of 9999 would ask for 10^8 weights per channel (a sweep's typo filled 24 GB)
MAX_KERNEL_SIZE = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: mean / std of Inception-style preprocessing (pixels to [-1, 1]): RepLKNet-XL's MegData-73M weights (official
#: ``--imagenet_default_mean_and_std false``; its downstream configs: mean = std = 127.5)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
