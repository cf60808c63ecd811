"""bild-fairseq: Big Little Decoder for fairseq, plus a batch job runner."""
from setuptools import find_packages, setup

setup(
    name="bild-fairseq",
    version="0.1.0",
    description="Big Little Decoder (BiLD) generation for stock fairseq, and a sharded batch runner",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["bild_fairseq", "bild_fairseq.*", "jobs", "jobs.*"]),
    install_requires=[
        # torch: pinned to the CPU build on this project's machines; a GPU user installs the CUDA
        # torch of the same version first (see README), which this pin then accepts.
        "torch==2.13.0",
        # fairseq 0.12.2 does not install on Python >= 3.11; ve-fairseq is the same code with wheels.
        "fairseq==0.12.2; python_version < '3.11'",
        "ve-fairseq==0.12.3; python_version >= '3.11'",
        "sacremoses>=0.1",
        "subword-nmt>=0.3.8",
        # pairs whose models were trained on SentencePiece pieces (pair.json "text")
        "sentencepiece>=0.2",
        "sacrebleu>=2.4,<3",
        "rouge-score>=0.1.2",
        "click>=8.1",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # the onnxruntime engine (--bild-engine onnxruntime): the models exported with torch's own
        # exporter (onnx), 8-bit weights by ORT's MatMulNBitsQuantizer (which needs onnx_ir)
        "onnxruntime>=1.20,<2",
        "onnx>=1.16",
        "onnx_ir>=0.1",
    ],
    # peers: engines the benchmark compares BiLD with (CTranslate2 rows of `bild-jobs bench`);
    # the tests check those rows' plumbing, so the test extra includes them
    extras_require={"peers": ["ctranslate2>=4.5,<5"],
                    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ctranslate2>=4.5,<5"]},
    entry_points={"console_scripts": ["bild-jobs=jobs.cli:main"]},
)
