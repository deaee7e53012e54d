from setuptools import find_packages, setup

setup(
    name="sslight-dali",
    version="0.1.0",
    description="Self-supervised pre-training of small vision backbones (SSLight recipe) with GPU view sampling in NVIDIA DALI",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # The shipped configs and recipes live at the repository root (configs/, pipelines/) and are
    # installed inside the package as sslight_dali/configs and sslight_dali/pipelines, where
    # `sslight train dino/resnet18_sslight` finds them from any folder (config.shipped_dir).
    packages=find_packages(include=["sslight_dali", "sslight_dali.*"]) + ["sslight_dali.configs",
                                                                           "sslight_dali.pipelines"],
    package_dir={"sslight_dali.configs": "configs", "sslight_dali.pipelines": "pipelines"},
    package_data={"sslight_dali.configs": ["*/*.yaml"], "sslight_dali.pipelines": ["*.yaml"]},
    python_requires=">=3.10",
    # Ranges for users; `requirements.txt` pins the set verified together (what `make` and Docker install).
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "nvidia-dali-cuda130>=2.0",
        "timm>=1.0",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    # tests: the runner, yacs/fvcore for the reference checkpoints built in tests/export/test_export.py, and
    # mypy with the YAML library's types for the static type check (mypy.ini, tests/test_types.py)
    extras_require={"test": ["pytest>=8.0", "yacs>=0.1.8", "fvcore>=0.1.5", "mypy>=1.10", "types-PyYAML>=6.0"],
                    "onnx": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
                    "hf": ["safetensors>=0.4"],
                    "parquet": ["pyarrow>=14"]},
    entry_points={"console_scripts": ["sslight=sslight_dali.cli:main"]},
)
