"""The CPU demo: SmolLM2-135M learns to see Fashion-MNIST and scikit-image's photographs through
a frozen ImageNet EfficientNet-Lite0, from data and weights that ship in packages.

A project on the library, as a user's own would be: importing this package registers its data
sources (``fashion_mnist_pairs``, ``fashion_mnist_fewshot``, ``skimage_photos``), its evaluation
tasks (``fashion_mnist``, ``fashion_mnist_vqa``, ``fashion_mnist_captions``,
``skimage_captions``) and its pretrained weights (``smollm2``, ``lite0``); its gin files start
with ``import flamingo_jax.demo``. The library never imports it.

  python -m flamingo_jax.main --gin_file=flamingo_jax/demo/demo_cpu.gin --workdir=/tmp/flamingo_demo
"""

from flamingo_jax.demo import collections, fashion_mnist, photos, weights  # noqa: F401  (registrations)
