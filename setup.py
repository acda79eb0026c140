from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="mmptm",
    version="0.1.0",
    description="Multimodal and multilingual pretraining: CLIP, VisualBERT, ViLBERT, DALL-E, XLM-style objectives",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mmptm", "mmptm.*"]) + ["mmptm.configs"],
    # The bundled recipes live in the top-level configs/ folder of the checkout
    # and install as the package data of mmptm.configs, so bare config names
    # resolve after a plain `pip install .` too.
    package_dir={"mmptm.configs": "configs"},
    package_data={"mmptm.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0",
        "sentencepiece>=0.2",
        "regex>=2022.1.18",
        "ftfy>=6.1",
        "webdataset>=1.0",
        "accelerate>=1.0",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "numpy>=1.24",
        "pillow>=10.0",
        "scikit-learn>=1.3",
        "num2words>=0.5.13",
        "babel>=2.14",
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.5",
            "open_clip_torch>=2.24",
            "transformers>=4.40",
            "clip_benchmark>=1.6",
            "requests>=2.28",  # clip_benchmark imports it without declaring it
            "sacrebleu>=2.0",  # the reference chrF that tests/test_mbart.py checks mmptm's against
        ],
        "interop": ["open_clip_torch>=2.24", "transformers>=4.40", "tokenizers>=0.15"],
    },
    entry_points={"console_scripts": ["mmptm=mmptm.cli:main"]},
)
