"""Install userllm (one distribution; ``kernels/`` and ``profiling/`` ship as ``userllm.kernels`` and
``userllm.profiling`` through the relative symlinks inside ``userllm/``).

Torch is a run-time requirement only: build with ``pip install --no-build-isolation`` so the build uses
the torch already installed, and never a fresh one pulled into an isolated build environment.
"""

from setuptools import find_packages, setup

setup(
    name="userllm",
    version="0.1.0",
    description="User-LLM: contextualizing LLMs with user embeddings, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["userllm", "userllm.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.46",
        "peft>=0.13",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "nvidia-ml-py>=12",
        "tqdm>=4.66",
        "numpy>=1.24",
        "pyarrow>=14",
        "pyyaml>=6",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4", "pytest-timeout>=2"]},
)
