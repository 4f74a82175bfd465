"""Data: Fashion-MNIST (bundled subset and IDX files), the emoji caption set, folders of images, memory limits.

The names below are the package's public surface; import them from ``latentdiff.data``.
"""

from latentdiff.data.datasets import BUNDLED_NPZ, BUNDLED_SIZES, SOURCES, SPLITS, load_dataset
from latentdiff.data.emoji import CATEGORIES as EMOJI_CATEGORIES
from latentdiff.data.emoji import EmojiData, find_emoji, load_emoji
from latentdiff.data.emoji_download import download_emoji
from latentdiff.data.fashion_mnist import (
    CLASS_NAMES,
    FASHION_MNIST_MD5,
    FASHION_MNIST_SPLITS,
    cache_dir,
    download_fashion_mnist,
    find_fashion_mnist,
)
from latentdiff.data.folders import IMAGE_FORMATS, as_mode, load_image_folder, open_image
from latentdiff.data.idx import read_idx
from latentdiff.data.image_data import ImageData

__all__ = ["BUNDLED_NPZ", "BUNDLED_SIZES", "CLASS_NAMES", "EMOJI_CATEGORIES", "EmojiData", "download_emoji",
           "find_emoji", "load_emoji", "FASHION_MNIST_MD5", "FASHION_MNIST_SPLITS",
           "IMAGE_FORMATS", "SOURCES", "SPLITS", "ImageData", "as_mode", "cache_dir", "download_fashion_mnist",
           "find_fashion_mnist", "load_dataset", "load_image_folder", "open_image", "read_idx"]
