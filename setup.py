"""Packaging for nnunet-ssl.

The design card keeps four top-level folders; they map into one import namespace:
``nnunet_ssl/`` -> ``nnunet_ssl``, ``trainers/`` -> ``nnunet_ssl.trainers``,
``pretraining/`` -> ``nnunet_ssl.pretraining``, ``plans/`` -> ``nnunet_ssl.plans``.
"""
from setuptools import find_packages, setup

FOLDER_TO_PACKAGE = {
    "nnunet_ssl": "nnunet_ssl",
    "trainers": "nnunet_ssl.trainers",
    "pretraining": "nnunet_ssl.pretraining",
    "plans": "nnunet_ssl.plans",
}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder, package in FOLDER_TO_PACKAGE.items():
        packages.append(package)
        package_dir[package] = folder
        for sub in find_packages(folder):
            packages.append(f"{package}.{sub}")
            package_dir[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="nnunet-ssl",
    version="0.1.0",
    description="nnU-Net v2 plugin: self-supervised pretraining of 3D Swin Transformers for segmentation",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "dynamic-network-architectures",
        "batchgenerators",
        "SimpleITK",
        "nibabel>=5",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "pyyaml",
    ],
    # ruff and mypy pinned: `make lint` must give the same verdict on every machine
    extras_require={"test": ["pytest", "pytest-xdist", "monai", "ruff==0.17.6", "mypy==2.4.1"]},
    entry_points={"console_scripts": ["nnunet-ssl=nnunet_ssl.cli:main"]},
)
