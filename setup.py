"""Package layout: kernels/ in the repository is shipped as dsrl_fast.kernels.

A top-level `kernels` module would shadow Hugging Face's `kernels` package, which transformers imports.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dsrl_fast", "dsrl_fast.*"]) + ["dsrl_fast.kernels"],
    package_dir={"dsrl_fast": "dsrl_fast", "dsrl_fast.kernels": "kernels"},
    package_data={"dsrl_fast": ["train/presets/*.yaml"]},
)
